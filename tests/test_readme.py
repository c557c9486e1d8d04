"""The README's examples run as written: every fenced block whose info string is `bash run` or `python run` is
executed in a fresh directory, so an example that stops working fails CI. The `openai` example talks to a real
`chorus serve` on the built-in model, started here on a free port in place of the README's 8000."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chorus.server.conftest import ServerProcess

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```(bash|python) run\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)  # `chorus` and `python` of this environment
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"], "PYTHONUNBUFFERED": "1"}


def test_the_readme_marks_its_examples():
    kinds = [kind for kind, _ in BLOCKS]
    assert kinds.count("bash") >= 1 and kinds.count("python") >= 3, kinds


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        pytest.param(kind, code, id=f"{i}-{kind}", marks=pytest.mark.slow)  # models load, kernels compile
        for i, (kind, code) in enumerate(BLOCKS)
    ],
)
def test_readme_block_runs(kind, code, tmp_path):
    server = None
    if "127.0.0.1:8000" in code:
        server = ServerProcess("builtin", tmp_path / "server", tmp_path / "server.log")
        server.wait_ready()
        code = code.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
    try:
        argv = ["bash", "-euo", "pipefail", "-c", code] if kind == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        if server is not None:
            server.stop()
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
