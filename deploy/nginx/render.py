"""Renders deploy/nginx/nginx.conf.template for a list of batchserve replicas.

    python deploy/nginx/render.py replica-0:8000 replica-1:8000 > nginx.conf
    python deploy/nginx/render.py --listen 127.0.0.1:8080 --runtime-dir /tmp/ngx \\
        127.0.0.1:8001 127.0.0.1:8002 > /tmp/ngx/nginx.conf

`deploy/nginx/nginx.conf` is the rendering for the 4-GPU compose file (`--compose 4`); the tests
and `python -m benchmarks.scaleout` render the same template for loopback replicas.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "nginx.conf.template"
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")

# batchserve's defaults (--max-body-bytes, --request-timeout-s): keep them equal.
MAX_BODY_BYTES = 65536
REQUEST_TIMEOUT_S = 300.0
# A batch at the largest shape plus encoding, on top of the request budget.
BATCH_MARGIN_S = 120.0


@dataclass(frozen=True)
class NginxConfig:
    upstreams: Sequence[str]
    listen: str = "8080"
    runtime_dir: Path | None = None  # pid, logs and temp files; None: the distro's paths
    max_body_bytes: int = MAX_BODY_BYTES
    request_timeout_s: float = REQUEST_TIMEOUT_S
    user: str | None = None  # `user` directive; only meaningful when nginx starts as root
    fail_timeout_s: int = 2

    @property
    def read_timeout_s(self) -> int:
        return int(self.request_timeout_s + BATCH_MARGIN_S)


def render(config: NginxConfig) -> str:
    if not config.upstreams:
        raise ValueError("at least one upstream replica is needed")
    run = config.runtime_dir
    # A replica that failed (refused, or answered 503) is skipped for fail_timeout, then tried
    # again: short, so a restarted replica gets traffic again within seconds.
    servers = "\n".join(
        f"        server {u} max_fails=1 fail_timeout={config.fail_timeout_s}s;"
        for u in config.upstreams
    )
    values = {
        "USER": f"user {config.user};" if config.user else "",
        "PID": str(run / "nginx.pid") if run else "/run/nginx.pid",
        "ERROR_LOG": str(run / "error.log") if run else "/dev/stderr",
        "ACCESS_LOG": str(run / "access.log") if run else "/dev/stdout",
        "TEMP": str(run / "temp") if run else "/tmp",
        "SERVERS": servers,
        "LISTEN": config.listen,
        "MAX_BODY_BYTES": str(config.max_body_bytes),
        "READ_TIMEOUT_S": str(config.read_timeout_s),
        "TRIES": str(len(config.upstreams)),
    }

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]

    return PLACEHOLDER.sub(fill, TEMPLATE.read_text())


def write(config: NginxConfig, path: Path) -> Path:
    """Renders to `path`, creating the runtime directories nginx expects."""
    if config.runtime_dir is not None:
        (config.runtime_dir / "temp").mkdir(parents=True, exist_ok=True)
    path.write_text(render(config))
    return path


def compose_upstreams(replicas: int, port: int = 8000) -> list[str]:
    return [f"replica-{i}:{port}" for i in range(replicas)]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("upstreams", nargs="*", help="HOST:PORT of each replica")
    p.add_argument("--compose", type=int, metavar="N",
                   help="the replicas replica-0..N-1:8000 of deploy/nginx/compose.yml")
    p.add_argument("--listen", default="8080")
    p.add_argument("--runtime-dir", type=Path)
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES)
    p.add_argument("--request-timeout-s", type=float, default=REQUEST_TIMEOUT_S)
    opts = p.parse_args(argv)
    upstreams = list(opts.upstreams) + compose_upstreams(opts.compose or 0)
    config = NginxConfig(upstreams, opts.listen, opts.runtime_dir, opts.max_body_bytes,
                         opts.request_timeout_s)
    sys.stdout.write(render(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
