"""One user, one request at a time: the latency a lone client sees.

    locust -f benchmarks/locustfiles/single_user.py --headless -u 1 -r 1 -t 60s \
        --host http://127.0.0.1:8000 --csv benchmarks/results/single_user
"""

from __future__ import annotations

from benchmarks.locustfiles.common import SameRequestUser


class SingleUser(SameRequestUser):
    fixed_count = 1  # one user whatever -u says
