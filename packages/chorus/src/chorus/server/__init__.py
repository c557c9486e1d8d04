"""The Chorus server: an OpenAI-compatible Videos API over a persistent job queue, with metrics and a web page."""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
