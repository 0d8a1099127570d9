"""Soak scenario: users post `/t2i` back to back so the server stays saturated.

A 200 image is a success; a 429 with `Retry-After` is deliberate backpressure (counted apart,
not a failure; the user then backs off for the advised time, capped); anything else, including
a dropped connection or a timeout (status 0), is a failure. When Locust quits, the counts are
written as JSON to `$SOAK_SUMMARY` for `benchmarks/soak.py`.

With SOAK_SEND_S set, users send for that many seconds, then each stops after its last answer
and Locust quits when all have: Locust's own `--run-time` stop can kill a user in the middle of
a request, which would read as a request the server never answered.

Environment: SOAK_SUMMARY (path), SOAK_SEND_S, SOAK_WIDTH / SOAK_HEIGHT / SOAK_STEPS (default
64 64 1), SOAK_BACKOFF_CAP_S (default 1).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Any

import gevent  # type: ignore[import-untyped]
from locust import FastHttpUser, events, task
from locust.exception import StopUser

WIDTH = int(os.environ.get("SOAK_WIDTH", "64"))
HEIGHT = int(os.environ.get("SOAK_HEIGHT", "64"))
STEPS = int(os.environ.get("SOAK_STEPS", "1"))
BACKOFF_CAP_S = float(os.environ.get("SOAK_BACKOFF_CAP_S", "1"))
SEND_S = float(os.environ["SOAK_SEND_S"]) if os.environ.get("SOAK_SEND_S") else None
PROMPTS = ("a lighthouse at dusk", "a red fox in the snow", "a bowl of ramen, studio light")

COUNTS: Counter[str] = Counter()
FAILURES: Counter[str] = Counter()
_run = {"stop_at": float("inf"), "active": 0}


@events.test_start.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook
def start_clock(environment: Any, **_: Any) -> None:
    if SEND_S is not None:
        _run["stop_at"] = time.monotonic() + SEND_S


class SoakUser(FastHttpUser):
    network_timeout = 120.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.backoff_s = 0.0
        _run["active"] += 1

    def on_stop(self) -> None:
        _run["active"] -= 1
        runner = self.environment.runner
        if _run["active"] <= 0 and time.monotonic() >= _run["stop_at"] and runner is not None:
            gevent.spawn(runner.quit)  # not from this user's greenlet, which is ending

    def wait_time(self) -> float:
        """Between requests, never during one: the only place a user stops by itself."""
        if time.monotonic() >= _run["stop_at"]:
            raise StopUser()
        backoff, self.backoff_s = self.backoff_s, 0.0
        return backoff

    @task
    def t2i(self) -> None:
        payload = {
            "prompt": random.choice(PROMPTS),
            "seed": random.randrange(2**63),
            "width": WIDTH,
            "height": HEIGHT,
            "inference_steps": STEPS,
        }
        COUNTS["sent"] += 1
        with self.client.post("/t2i", json=payload, name="/t2i", catch_response=True) as resp:
            status = resp.status_code or 0
            COUNTS["answered"] += status > 0
            COUNTS[f"status_{status}"] += 1
            headers = resp.headers or {}
            verdict = judge(status, headers.get("Content-Type", ""),
                            headers.get("Retry-After", ""), resp.content or b"")
            if verdict is None:
                resp.success()
            else:
                FAILURES[verdict] += 1
                resp.failure(verdict)
            if status == 429:
                COUNTS["rejected_429"] += 1
                retry_after = headers.get("Retry-After", "1")
                self.backoff_s = min(float(retry_after) if retry_after.isdigit() else 1.0,
                                     BACKOFF_CAP_S)


def judge(status: int, content_type: str, retry_after: str, content: bytes) -> str | None:
    """None when the answer is one the contract allows at saturation, else why not."""
    if status == 200:
        if content_type != "image/png" or not content.startswith(b"\x89PNG"):
            return "200 without a PNG body"
        return None
    if status == 429:
        if not retry_after.isdigit() or int(retry_after) < 1:
            return "429 without a valid Retry-After"
        if b'"queue_full"' not in content:
            return "429 without the queue_full error body"
        return None
    return "no response (connection error or timeout)" if status == 0 else f"HTTP {status}"


@events.quitting.add_listener  # type: ignore[untyped-decorator]  # locust's EventHook
def write_summary(environment: Any, **_: Any) -> None:
    path = os.environ.get("SOAK_SUMMARY")
    if not path:
        return
    total = environment.stats.total
    summary = {
        "counts": dict(COUNTS),
        "failures": dict(FAILURES),
        "locust": {
            "requests": total.num_requests,
            "failures": total.num_failures,
            "rps": round(total.total_rps, 2),
            "p50_ms": total.get_response_time_percentile(0.5),
            "p95_ms": total.get_response_time_percentile(0.95),
            "p99_ms": total.get_response_time_percentile(0.99),
            "max_ms": round(total.max_response_time),
        },
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2)
