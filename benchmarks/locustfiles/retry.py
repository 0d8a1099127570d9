"""Seed 004's client shape (issue 18): closed loop, FastHttpUser, no wait, a 60 s network
timeout, retrying at once whatever the answer (a 503 or 429 included). Run by
`benchmarks/retry.py` with 1 user, then 8, against one server.
"""

from __future__ import annotations

from benchmarks.locustfiles.common import SameRequestUser


class ImpatientRetryingUser(SameRequestUser):
    network_timeout = 60.0
