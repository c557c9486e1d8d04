"""Server fixtures: a live in-process server on loopback over the tiny random Wan pipeline, and helpers to run
`chorus serve` as a real subprocess (for the kill-and-restart test)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

HOST = "127.0.0.1"
# What every test job asks for: the tiny model takes 16x16, and 0.5 s at 8 fps is 4 frames, rounded up to the
# 5 its VAE takes (1 + 4k). Few steps, so a job takes a fraction of a second on a busy 2-core machine.
TINY_JOB = {"size": "16x16", "seconds": "0.5"}
TINY_EXTRA = {"steps": 3, "guidance_scale": 1.0}  # no classifier-free guidance: one transformer call a step


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Server tests run torch on one thread: on a small shared machine it is several times faster than two
    threads fighting other processes for the cores. Restored after each test, so other tests are unaffected."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class LiveServer:
    url: str
    app: object
    data_dir: Path
    server: object
    thread: threading.Thread

    @property
    def store(self):
        return self.app.state.store

    @property
    def worker(self):
        return self.app.state.worker

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def wait_idle(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = self.store.counts()
            if counts["queued"] == 0 and counts["in_progress"] == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"jobs still pending: {self.store.counts()}")


def start_live_server(engine, data_dir: Path, **kwargs) -> LiveServer:
    import uvicorn

    from chorus.server import create_app

    app = create_app(engine, data_dir, model_id="tiny", **kwargs)
    config = uvicorn.Config(app, host=HOST, port=0, log_config=None, access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://{HOST}:{port}", app, data_dir, server, thread)


def stop_live_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(30)
    live.store.close()
    live.app.state.lock.close()


@pytest.fixture(scope="session")
def tiny_engine(tiny_wan_dir, tmp_path_factory):
    from chorus.engine import ChorusEngine

    return ChorusEngine.from_pretrained(tiny_wan_dir, cache_dir=tmp_path_factory.mktemp("engine-cache"))


@pytest.fixture(scope="session")
def live_server(tiny_engine, tmp_path_factory):
    """One server for the API, load and browser tests; its queue holds 8 jobs."""
    live = start_live_server(tiny_engine, tmp_path_factory.mktemp("server-data"), max_queue=8)
    yield live
    stop_live_server(live)


# ---- a real `chorus serve` process ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir: Path, data_dir: Path, log_path: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        args = ["serve", "--model", str(model_dir), "--data-dir", str(data_dir), "--host", HOST]
        args += ["--port", str(self.port), "--threads", "1", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chorus.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
