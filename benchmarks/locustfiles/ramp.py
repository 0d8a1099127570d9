"""The classic production-like ramp: users arrive slowly (default 8 users at 0.02 users/s, one
every 50 s), then hold, so every load level between idle and busy is seen once.

RAMP_USERS and RAMP_RATE change the target and the arrival rate; -t bounds the run
(the ramp alone takes RAMP_USERS / RAMP_RATE seconds: 400 s by default).

    locust -f benchmarks/locustfiles/ramp.py --headless -t 600s \
        --host http://127.0.0.1:8000 --csv benchmarks/results/ramp
"""

from __future__ import annotations

import os

from locust import LoadTestShape

from benchmarks.locustfiles.common import SameRequestUser

USERS = int(os.environ.get("RAMP_USERS", "8"))
RATE = float(os.environ.get("RAMP_RATE", "0.02"))


class RampUser(SameRequestUser):
    pass


class Ramp(LoadTestShape):
    use_common_options = True  # -t still bounds the run

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        run_time = getattr(options, "run_time", None)
        if run_time and self.get_run_time() >= run_time:
            return None
        return USERS, RATE
