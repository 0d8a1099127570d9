"""A spike: a steady trickle, a sudden burst of users, then the trickle again. Shows queueing,
backpressure and recovery: once --max-queue requests wait, the server answers 429, which Locust
marks failed ("HTTP 429: ..."), so the failure count is how many requests were turned away.

BURST_BASE (users, default 2), BURST_PEAK (default 32) and BURST_STAGE_S (default 30: the
base, the burst and the tail each last one stage) shape it; the run ends after the tail.

    locust -f benchmarks/locustfiles/burst.py --headless \
        --host http://127.0.0.1:8000 --csv benchmarks/results/burst
"""

from __future__ import annotations

import os

from locust import LoadTestShape

from benchmarks.locustfiles.common import SameRequestUser

BASE = int(os.environ.get("BURST_BASE", "2"))
PEAK = int(os.environ.get("BURST_PEAK", "32"))
STAGE_S = float(os.environ.get("BURST_STAGE_S", "30"))


class BurstUser(SameRequestUser):
    pass


class Burst(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t < STAGE_S:
            return BASE, BASE
        if t < 2 * STAGE_S:
            return PEAK, PEAK  # everyone arrives within a second
        if t < 3 * STAGE_S:
            return BASE, PEAK
        return None
