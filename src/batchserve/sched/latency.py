"""How long a batch of n takes, for one batching key: `t(n) = a + b*n`, fitted online.

Weighted least squares over the batches that ran, each older observation's weight decayed by
`decay` per new one, so the fit follows a machine whose speed drifts. Until two batch sizes
have been seen there is no slope to fit; then the model assumes no batching gain
(`t(n) = n * t(n0) / n0`), which over-estimates big batches: the scheduler tries them only as
far as budgets allow, and every batch that runs teaches the model the real slope.
"""

from __future__ import annotations

from dataclasses import dataclass

_MIN_WEIGHT = 1e-3


@dataclass(slots=True)
class BatchTimeModel:
    decay: float = 0.9
    _w: float = 0.0
    _n: float = 0.0
    _nn: float = 0.0
    _t: float = 0.0
    _nt: float = 0.0

    def observe(self, size: int, seconds: float, weight: float = 1.0) -> None:
        """One batch of `size` items took `seconds` (a warm-up seed may weigh less)."""
        if size < 1 or seconds <= 0:
            return
        d = self.decay
        self._w = self._w * d + weight
        self._n = self._n * d + weight * size
        self._nn = self._nn * d + weight * size * size
        self._t = self._t * d + weight * seconds
        self._nt = self._nt * d + weight * size * seconds

    @property
    def known(self) -> bool:
        return self._w > _MIN_WEIGHT

    def coefficients(self) -> tuple[float, float] | None:
        """(a, b) seconds, both >= 0; None before any observation."""
        if not self.known:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n < 1e-6:  # one size seen: proportional, no batching gain assumed
            return 0.0, mean_t / mean_n
        b = (self._nt / self._w - mean_n * mean_t) / var_n
        if b <= 0:  # noise made bigger batches look cheaper: flat at the mean
            return mean_t, 0.0
        a = mean_t - b * mean_n
        if a < 0:  # through the origin instead of a negative fixed cost
            return 0.0, self._nt / self._nn
        return a, b

    def predict(self, size: int) -> float | None:
        """Predicted seconds for a batch of `size`; None while unknown."""
        coef = self.coefficients()
        if coef is None:
            return None
        a, b = coef
        return a + b * size

    def largest_within(self, seconds: float, limit: int) -> int:
        """The largest n <= limit predicted to take at most `seconds` (0 if not even one)."""
        coef = self.coefficients()
        if coef is None:
            return limit
        a, b = coef
        if b <= 0:
            return limit if a <= seconds else 0
        return max(0, min(limit, int((seconds - a) / b + 1e-9)))
