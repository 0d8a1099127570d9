"""What the scheduler learns per batching key: batch time against size (`latency`), client
patience and the AIMD batch cap (`patience`). No clock of its own: callers pass `now`.

Keys are bounded (least recently used are forgotten beyond `max_keys`), so metrics labelled by
key stay few even though guidance scales are floats.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .latency import BatchTimeModel
from .patience import AimdCap, Patience


class KeyHooks(Protocol):
    def key_state(self, label: str, cap: int, patience_s: float | None) -> None: ...

    def key_forgotten(self, label: str) -> None: ...


@dataclass(slots=True)
class KeyState:
    label: str
    aimd: AimdCap
    model: BatchTimeModel = field(default_factory=BatchTimeModel)
    patience: Patience = field(default_factory=Patience)


class Adaptive:
    """Per-key learning. With `enabled=False` the model still fits (it is shown in /v1/info)
    but the cap stays at `max_batch_size` and no patience is learned or applied."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        enabled: bool = True,
        label: Callable[[Hashable], str] = str,
        hooks: KeyHooks | None = None,
        max_keys: int = 64,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.enabled = enabled
        self._label = label
        self._hooks = hooks
        self._max_keys = max_keys
        self._keys: OrderedDict[Hashable, KeyState] = OrderedDict()
        self.size_limit: Callable[[Hashable], int] = lambda key: max_batch_size
        """The largest batch known to fit in memory per key (`batchsize.BatchSizes.limit`; the
        batcher wires it): it bounds the cap, enabled or not."""

    def state(self, key: Hashable) -> KeyState:
        st = self._keys.get(key)
        if st is None:
            st = KeyState(self._label(key), AimdCap(self.max_batch_size))
            self._keys[key] = st
            while len(self._keys) > self._max_keys:
                _, old = self._keys.popitem(last=False)
                if self._hooks is not None:
                    self._hooks.key_forgotten(old.label)
        else:
            self._keys.move_to_end(key)
        return st

    def cap(self, key: Hashable) -> int:
        """The effective batch size of `key`: the least of `max_batch_size`, the learned
        out-of-memory limit and (enabled) the AIMD cap."""
        limit = min(self.max_batch_size, self.size_limit(key))
        if not self.enabled:
            return limit
        st = self._keys.get(key)
        return min(limit, st.aimd.cap) if st is not None else limit

    def predict(self, key: Hashable, size: int) -> float | None:
        st = self._keys.get(key)
        return st.model.predict(size) if st is not None else None

    def largest_within(self, key: Hashable, seconds: float, limit: int) -> int:
        st = self._keys.get(key)
        return st.model.largest_within(seconds, limit) if st is not None else limit

    def patience(self, key: Hashable, now: float) -> float | None:
        if not self.enabled:
            return None
        st = self._keys.get(key)
        return st.patience.estimate(now) if st is not None else None

    # -- what happened ---------------------------------------------------------------------

    def seed(self, key: Hashable, size: int, seconds: float) -> None:
        """A warm-up timing: weighs half a real batch (the first run pays one-time costs)."""
        self.state(key).model.observe(size, seconds, weight=0.5)

    def batch_ran(self, key: Hashable, size: int, seconds: float) -> None:
        self.state(key).model.observe(size, seconds)

    def gave_up(self, key: Hashable, age_s: float, now: float) -> None:
        if not self.enabled:
            return
        st = self.state(key)
        st.patience.gave_up(age_s, now)
        self._publish(st, now)

    def batch_ended(self, key: Hashable, size: int, left: int, now: float) -> None:
        """`left`: members whose clients left (or timed out) while the batch ran."""
        if not self.enabled:
            return
        st = self.state(key)
        if left:
            st.aimd.clients_left()
        else:
            st.aimd.clients_stayed(size)
        self._publish(st, now)

    def _publish(self, st: KeyState, now: float) -> None:
        if self._hooks is not None:
            self._hooks.key_state(st.label, st.aimd.cap, st.patience.estimate(now))

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for st in self._keys.values():
            coef = st.model.coefficients()
            out[st.label] = {
                "cap": st.aimd.cap if self.enabled else self.max_batch_size,
                "patience_s": _round(st.patience.estimate(now)) if self.enabled else None,
                "batch_s": None if coef is None else {"fixed": _round(coef[0]),
                                                      "per_image": _round(coef[1])},
            }
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
