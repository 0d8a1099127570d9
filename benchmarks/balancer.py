"""A real nginx on 127.0.0.1 in front of loopback replicas, from deploy/nginx's template.

Used by `python -m benchmarks.scaleout` and tests/test_deploy_nginx.py. Everything nginx writes
(pid, logs, temp files) stays in one work directory, so it runs without root and leaves nothing
behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.serve import HOST, free_port
from deploy.nginx.render import NginxConfig, write

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")


def nginx_path() -> str | None:
    for candidate in NGINX_CANDIDATES:
        found = shutil.which(candidate) or shutil.which(candidate, path="/usr/sbin:/usr/bin")
        if found:
            return found
    return None


def loopback_config(upstreams: Sequence[str], workdir: Path, port: int) -> NginxConfig:
    # As root, nginx's workers would drop to `nobody`, who cannot write our work directory.
    user = "root" if os.geteuid() == 0 else None
    return NginxConfig(upstreams, listen=f"{HOST}:{port}", runtime_dir=workdir, user=user)


def check(nginx: str, conf: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """`nginx -t` on `conf` with every path under `workdir`."""
    return subprocess.run(
        [nginx, "-t", "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf)],
        capture_output=True, text=True, timeout=30, check=False,
    )


@dataclass
class Balancer:
    url: str
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def records(self) -> list[dict[str, Any]]:
        """The access log so far, one dict per request (nginx buffers nothing: no `buffer=`)."""
        if not self.access_log.exists():
            return []
        lines = self.access_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
        return True
    return False


@contextlib.contextmanager
def balancer(upstreams: Sequence[str], workdir: Path, nginx: str,
             timeout_s: float = 15.0) -> Iterator[Balancer]:
    """nginx in the foreground on a free loopback port until the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = write(loopback_config(upstreams, workdir, port), workdir / "nginx.conf")
    result = check(nginx, conf, workdir)
    if result.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{result.stderr}")
    cmd = [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(conf),
           "-g", "daemon off;"]
    with (workdir / "nginx.out").open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _listening(port):
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited {proc.returncode}: "
                                   + (workdir / "error.log").read_text()[-2000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"nginx not listening in {timeout_s} s")
            time.sleep(0.05)  # polling an external process, bounded by the deadline
        yield Balancer(f"http://{HOST}:{port}", workdir, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in progress
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
