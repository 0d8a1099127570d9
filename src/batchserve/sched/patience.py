"""What clients of one batching key tolerate: how long they wait (`Patience`) and how big a
batch can be before they start leaving during it (`AimdCap`)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class Patience:
    """A low percentile of the ages at which recent clients gave up (disconnected, cancelled).

    Robust: one client that leaves at once, or one that waits forever, moves a low percentile
    little. Ages older than `window_s` are forgotten, so a key whose clients stopped leaving
    (because they are served in time, or because they became patient) returns to "unknown"
    rather than keeping a stale estimate forever.
    """

    quantile: float = 0.1
    min_samples: int = 5
    window_s: float = 300.0
    capacity: int = 64
    _ages: deque[tuple[float, float]] = field(default_factory=deque)

    def gave_up(self, age_s: float, now: float) -> None:
        self._ages.append((now, age_s))
        while len(self._ages) > self.capacity:
            self._ages.popleft()

    def estimate(self, now: float) -> float | None:
        """Seconds a client is predicted to wait; None until `min_samples` recent give-ups."""
        while self._ages and now - self._ages[0][0] > self.window_s:
            self._ages.popleft()
        if len(self._ages) < self.min_samples:
            return None
        ages = sorted(age for _, age in self._ages)
        pos = (len(ages) - 1) * self.quantile
        lo, hi = math.floor(pos), math.ceil(pos)
        return ages[lo] + (ages[hi] - ages[lo]) * (pos - lo)


@dataclass(slots=True)
class AimdCap:
    """Clipper's additive-increase / multiplicative-decrease batch size limit.

    Halved when clients leave a batch while it runs (the batch was too slow for them); +1 when a
    batch that filled the cap finished with every client still there. A batch smaller than the
    cap says nothing about the cap, so it does not raise it: the cap never drifts up during
    light traffic only to hurt the clients of the next burst.
    """

    limit: int
    cap: int = 0
    decrease: float = 0.5

    def __post_init__(self) -> None:
        self.cap = self.cap or self.limit

    def clients_left(self) -> None:
        self.cap = max(1, math.floor(self.cap * self.decrease))

    def clients_stayed(self, size: int) -> None:
        if size >= self.cap:
            self.cap = min(self.limit, self.cap + 1)
