"""Closed loop of impatient users: each gives up (closes its connection) after
BENCH_CLIENT_TIMEOUT_S seconds, then sends its next request at once, as a client with an HTTP
timeout does. A `503`/`429` with `Retry-After` is honoured: the user waits that long first.

BENCH_SEND_TIMEOUT=1 also sends the timeout as `timeout_s`; by default the server is not told
and must learn how long clients wait.

    BENCH_CLIENT_TIMEOUT_S=2 locust -f benchmarks/locustfiles/impatient.py --headless \\
        -u 16 -r 16 -t 60s --host http://127.0.0.1:8000
"""

from __future__ import annotations

import os
import time

from locust import task

from benchmarks.locustfiles.common import T2IUser

CLIENT_TIMEOUT_S = float(os.environ.get("BENCH_CLIENT_TIMEOUT_S", "60"))
SEND_TIMEOUT = os.environ.get("BENCH_SEND_TIMEOUT", "") == "1"


class ImpatientUser(T2IUser):
    network_timeout = CLIENT_TIMEOUT_S

    @task
    def generate(self) -> None:
        extra = {"timeout_s": CLIENT_TIMEOUT_S} if SEND_TIMEOUT else None
        status, headers = self.t2i(extra=extra)
        if status in (429, 503):
            time.sleep(float(headers.get("Retry-After", "1") or 1))  # gevent-patched
