"""Finish-time decisions from the learned batch times: what a request's budget is, whether it
can be admitted, and which queued items a batch should take so that its members finish in time.

Pure functions of the queue's state and `adaptive.Adaptive`; no clock, no asyncio. The batcher
calls them for whole batches, and a step-wise scheduler can call them for the items it lets
join a running batch.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from ..errors import CannotFinish, Overloaded
from .adaptive import Adaptive


class Queued(Protocol):
    """What these decisions read of a queued request (`batcher.Pending`)."""

    @property
    def enqueued(self) -> float: ...

    @property
    def deadline(self) -> float: ...

    @property
    def budget_end(self) -> float: ...

    def effective_priority(self, now: float, aging_s: float) -> int: ...


Q = TypeVar("Q", bound=Queued)


@dataclass(frozen=True, slots=True)
class InEngine:
    """The batch the engine is running: its key, size and start time."""

    key: Hashable
    size: int
    started: float


@dataclass(frozen=True, slots=True)
class Deadlines:
    adaptive: Adaptive
    max_wait_s: float
    aging_s: float

    def budget_s(self, key: Hashable, now: float, timeout_s: float, explicit: bool) -> float:
        """Seconds the client will wait: its own `timeout_s`, else the shape's learned patience
        when that is shorter. A patience below one image's time cannot be met anyway, so it is
        ignored rather than used to refuse everyone."""
        if explicit:
            return timeout_s
        patience = self.adaptive.patience(key, now)
        one = self.adaptive.predict(key, 1)
        if patience is not None and (one is None or one < patience) and patience < timeout_s:
            return patience
        return timeout_s

    def admit(self, key: Hashable, priority: int, now: float, timeout_s: float, budget_s: float,
              explicit: bool, running: InEngine | None,
              queued: Mapping[Hashable, Sequence[Queued]]) -> None:
        """Raises `CannotFinish` (504) for an explicit `timeout_s` shorter than a batch of one,
        `Overloaded` (503, `Retry-After` = predicted lateness) when the work ahead would make it
        finish past `budget_s`."""
        one = self.adaptive.predict(key, 1)
        if explicit and one is not None and one > timeout_s:
            raise CannotFinish(
                f"timeout_s={timeout_s:g} is shorter than one image of this shape takes "
                f"(about {one:.1f} s)", field="timeout_s")
        finish = self.finish_time(key, priority, now, running, queued, now + budget_s)
        if finish is not None and finish - now > budget_s:
            late = finish - now - budget_s
            raise Overloaded(
                f"the work ahead would finish this request in about {finish - now:.1f} s, "
                f"past its budget of {budget_s:.1f} s; retry later",
                retry_after_s=max(1.0, math.ceil(late)))

    def finish_time(self, key: Hashable, priority: int, now: float, running: InEngine | None,
                    queued: Mapping[Hashable, Sequence[Queued]],
                    budget_end: float = math.inf) -> float | None:
        """When a request submitted now would finish: the rest of the running batch, the groups
        of no lower priority, then its own group's batches up to and including its own. None
        while its own shape's batch time is unknown; other unknown shapes count as free.

        Queued items that can no longer finish in their budget even alone (`_live` leaves
        them out) are not counted: `fit` starts any item that can still make it before them,
        so they delay no newcomer that can. Counting them refused every fresh retry while a
        client about to leave still sat in the queue, and the engine idled (issue 18)."""
        predict = self.adaptive.predict
        if predict(key, 1) is None:
            return None
        ahead = 0.0
        if running is not None:
            took = predict(running.key, running.size)
            if took is not None:
                ahead += max(0.0, running.started + took - now)
        for k, items in queued.items():
            if k == key:
                continue
            live = self._live(k, items, now)
            if live and max(
                p.effective_priority(now, self.aging_s) for p in live
            ) >= priority:
                ahead += self._batches_time(k, len(live))
        members = self._live(key, queued.get(key, ()), now)
        before = sum(1 for p in members if p.effective_priority(now, self.aging_s) >= priority)
        cap = self.adaptive.cap(key)
        batches_before = before // cap
        mine = min(cap, len(members) + 1 - batches_before * cap)
        wait = 0.0
        if len(members) + 1 < cap:  # it waits for company, unless the engine is busy anyway
            wait_until = min((p.enqueued for p in members), default=now) + self.max_wait_s
            tightest = min([p.budget_end for p in members], default=budget_end)
            if not self._too_late_after(key, wait_until, min(tightest, budget_end)):
                wait = max(0.0, wait_until - now)
        own = self._batches_time(key, batches_before * cap) + (predict(key, mine) or 0.0)
        return now + max(ahead, wait) + own

    def _live(self, key: Hashable, items: Sequence[Q], now: float) -> list[Q]:
        """`items` without the hopeless ones: those that would end past their budget even in
        a batch of one started now (all of them while the shape's batch time is unknown)."""
        one = self.adaptive.predict(key, 1)
        if one is None:
            return list(items)
        return [p for p in items if now + one <= p.budget_end]

    def _batches_time(self, key: Hashable, n: int) -> float:
        """Predicted seconds to run `n` queued items of `key` in batches of its cap."""
        if n <= 0:
            return 0.0
        cap = self.adaptive.cap(key)
        full, rest = divmod(n, cap)
        total = full * (self.adaptive.predict(key, cap) or 0.0)
        if rest:
            total += self.adaptive.predict(key, rest) or 0.0
        return total

    def cannot_wait(self, key: Hashable, items: Sequence[Queued], wait_until: float) -> bool:
        """True when waiting for company until `wait_until` and then running a batch of the
        cap would finish past the tightest budget among `items`: then the batch starts now."""
        if not items:
            return False
        return self._too_late_after(key, wait_until, min(p.budget_end for p in items))

    def _too_late_after(self, key: Hashable, wait_until: float, budget_end: float) -> bool:
        took = self.adaptive.predict(key, self.adaptive.cap(key))
        return took is not None and wait_until + took > budget_end

    def unreachable(self, key: Hashable, items: Sequence[Q], now: float) -> list[Q]:
        """Items that would miss their `timeout_s` even in a batch of one started now."""
        one = self.adaptive.predict(key, 1)
        if one is None:
            return []
        return [p for p in items if now + one > p.deadline]

    def fit(self, key: Hashable, items: Sequence[Q], now: float) -> list[Q]:
        """The largest batch (up to the cap) whose members are all predicted to finish within
        their budgets, taken in the given order (priority, then oldest first: among those that
        can still make it, the least slack first). When none can make it, the freshest run:
        their clients have the most time left."""
        cap = self.adaptive.cap(key)
        for n in range(min(cap, len(items)), 0, -1):
            took = self.adaptive.predict(key, n)
            if took is None:
                return list(items[:n])
            fits = [p for p in items if now + took <= p.budget_end]
            if len(fits) >= n:
                return fits[:n]
        return sorted(items, key=lambda p: -p.enqueued)[:cap]
