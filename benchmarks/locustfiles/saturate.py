"""Closed loop, many users: each sends its next request the moment the last one is answered,
so the server always has work queued. Throughput at saturation; pick -u above max-batch-size.

    locust -f benchmarks/locustfiles/saturate.py --headless -u 16 -r 16 -t 120s \
        --host http://127.0.0.1:8000 --csv benchmarks/results/saturate
"""

from __future__ import annotations

from benchmarks.locustfiles.common import SameRequestUser


class SaturatingUser(SameRequestUser):
    pass
