"""What every scenario shares: the contract's request, the checks on the answer, and an exact
record of each request for the benchmark runner.

Environment (all optional): BENCH_WIDTH / BENCH_HEIGHT / BENCH_STEPS (default 256 256 20),
BENCH_GUIDANCE (7.5), BENCH_API_KEY (sent as `Authorization: Bearer`), BENCH_RECORD (a path:
on exit, one JSON record per request is written there; Locust's own percentiles are rounded
to 100 ms above one second, too coarse for the latency targets).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from typing import Any

from locust import FastHttpUser, constant, events, task

WIDTH = int(os.environ.get("BENCH_WIDTH", "256"))
HEIGHT = int(os.environ.get("BENCH_HEIGHT", "256"))
STEPS = int(os.environ.get("BENCH_STEPS", "20"))
GUIDANCE = float(os.environ.get("BENCH_GUIDANCE", "7.5"))
API_KEY = os.environ.get("BENCH_API_KEY", "")
PROMPTS = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, telephoto",
    "a bowl of ramen, studio light, 35mm",
    "an astronaut riding a horse on mars",
    "a watercolor map of an imaginary island",
)
RECORDS: list[dict[str, Any]] = []
_seeds = itertools.count(random.randrange(2**32))


def request_body(width: int = WIDTH, height: int = HEIGHT, steps: int = STEPS) -> dict[str, Any]:
    """The `/t2i` body every scenario sends: a random prompt, a fresh seed."""
    return {
        "prompt": random.choice(PROMPTS),
        "seed": next(_seeds),
        "width": width,
        "height": height,
        "inference_steps": steps,
        "guidance_scale": GUIDANCE,
    }


class T2IUser(FastHttpUser):
    """A closed-loop user: the next request goes out as soon as the last one is answered."""

    abstract = True
    wait_time = constant(0)
    network_timeout = 900.0  # a queued request on a busy CPU can take minutes; never time out
    connection_timeout = 10.0

    def t2i(self, width: int = WIDTH, height: int = HEIGHT, steps: int = STEPS,
            name: str = "/t2i", extra: dict[str, Any] | None = None) -> tuple[int, Any]:
        """Sends one request and records it; returns its status (0: no answer, e.g. the
        client's own timeout) and headers."""
        payload = {**request_body(width, height, steps), **(extra or {})}
        headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else None
        started = time.time()
        with self.client.post("/t2i", json=payload, headers=headers, name=name,
                              catch_response=True) as resp:
            ended = time.time()
            status = resp.status_code or 0
            got = resp.headers or {}
            problem = check(status, got.get("Content-Type", ""), resp.content or b"")
            if problem is None:
                resp.success()
            else:
                resp.failure(problem)
            RECORDS.append({
                "start": started,
                "end": ended,
                "status": status,
                "ok": problem is None,
                "key": f"{width}x{height}x{steps}",
                "batch_size": int(got.get("X-Batch-Size", "0") or 0),
                "queue_ms": float(got.get("X-Queue-Ms", "0") or 0),
                "inference_ms": float(got.get("X-Inference-Ms", "0") or 0),
            })
        return status, got


class SameRequestUser(T2IUser):
    """Sends the one request BENCH_WIDTH/HEIGHT/STEPS describe, over and over."""

    abstract = True

    @task
    def generate(self) -> None:
        self.t2i()


def check(status: int, content_type: str, body: bytes) -> str | None:
    """None for a good answer (200 and a PNG), else what was wrong with it."""
    if status == 0:
        return "no response (connection error or timeout)"
    if status != 200:
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"
    if content_type != "image/png" or not body.startswith(b"\x89PNG\r\n\x1a\n"):
        return f"200 but not a PNG (content-type {content_type!r})"
    return None


@events.quitting.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook
def _write_records(environment: Any, **_: Any) -> None:
    path = os.environ.get("BENCH_RECORD")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(RECORDS, fh)
