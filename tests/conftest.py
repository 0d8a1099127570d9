"""Shared fixtures: a real `batchserve serve` subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, *candidates: str) -> str:
    """The path of an external program a test needs (a real service: redis-server, nginx,
    chromium, weed, prometheus). Missing: skipped on a developer machine, failed under CI,
    where `./dev.sh test` must have installed it."""
    import shutil

    for candidate in (name, *candidates):
        found = shutil.which(candidate) or shutil.which(candidate, path="/usr/sbin:/usr/bin")
        if found:
            return found
    message = f"`{name}` not installed (./dev.sh test installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`python -m batchserve serve` on 127.0.0.1; `url` once /readyz answers 200."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = log.open("wb")
        cmd = [sys.executable, "-m", "batchserve", "serve", "--port", str(self.port),
               "--warmup", "64x64x1", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)  # polling an external process, bounded by the deadline
        raise TimeoutError(f"server not ready in {timeout_s} s:\n{self.logs()}")

    def logs(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_server(*args: str, tmp_path: Path, env: dict[str, str] | None = None,
                   name: str = "server", port: int | None = None) -> Iterator[ServerProcess]:
    server = ServerProcess(*args, env=env, log=tmp_path / f"{name}.log", port=port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One tiny-model server for the end-to-end tests (a long wait so batches fill by size)."""
    tmp = tmp_path_factory.mktemp("tiny_server")
    with running_server("--model", "tiny", "--max-wait-ms", "2000", tmp_path=tmp) as server:
        yield server


BOT_SERVER_KEY = "bots-test-key-0001"


@pytest.fixture(scope="session")
def bot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny server the chat bots' tests talk to: an API key, no batching wait, and sizes
    kept small (--max-pixels 8192: 64x64 by default, 96x64 and 64x96 offered)."""
    tmp = tmp_path_factory.mktemp("bot_server")
    with running_server("--model", "tiny", "--max-wait-ms", "0", "--max-pixels", "8192",
                        "--api-key", BOT_SERVER_KEY, tmp_path=tmp) as server:
        yield server
