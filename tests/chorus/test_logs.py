"""JSON logging follows sys.stderr as it is when a record is written."""

from __future__ import annotations

import io
import json
import logging
import sys

from chorus.logs import configure


def test_logs_go_to_the_current_stderr_after_the_configured_one_is_closed(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure(logging.INFO)
        first.close()  # e.g. pytest's capture of an earlier test, or a notebook's cell output
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("chorus.test").info("still written", extra={"job": 7})
        record = json.loads(second.getvalue())
        assert record["message"] == "still written" and record["job"] == 7
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
