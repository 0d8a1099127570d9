"""Weighted fair shares between tenants, for the one request queue.

Deficit round robin with a unit cost per image is, for picking one slot at a time, the same as
serving the tenant with the least *virtual time* (images served divided by weight) first; that
is what is kept here, because it orders any list of candidates at once (the queue fills a batch
slot by slot, and the deadline policy wants the whole group in its order before fitting it).

- A tenant alone gets every slot: there is nobody to alternate with.
- Two tenants that keep the queue full with weights 3:1 get slots 3:1.
- A tenant that was idle does not come back with credit saved up: on its return its virtual
  time is raised to the least one among the tenants that have work queued (start-time fair
  queueing), so it gets its share from now on, not a burst that starves the others.

Fairness only breaks ties the existing rules leave: effective priority (with aging) comes first,
then the tenant's turn, then arrival order. It knows nothing of keys; the queue asks per group.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar


class Item(Protocol):
    @property
    def tenant(self) -> str: ...

    @property
    def seq(self) -> int: ...


It = TypeVar("It", bound=Item)


class FairShare:
    def __init__(self, weight: Callable[[str], float] = lambda name: 1.0) -> None:
        self.weight = weight
        self._vtime: dict[str, float] = {}

    def vtime(self, tenant: str) -> float:
        return self._vtime.get(tenant, 0.0)

    def activate(self, tenant: str, active: Iterable[str]) -> None:
        """`tenant` has queued work again: no credit for the time it had none."""
        floor = min((self._vtime.get(t, 0.0) for t in active if t != tenant), default=None)
        if floor is not None and self._vtime.get(tenant, 0.0) < floor:
            self._vtime[tenant] = floor

    def charge(self, items: Iterable[Item]) -> None:
        """`items` took batch slots: each costs its tenant 1/weight of virtual time."""
        for item in items:
            self._vtime[item.tenant] = (self._vtime.get(item.tenant, 0.0)
                                        + 1.0 / max(self.weight(item.tenant), 1e-6))

    def forget(self, keep: Iterable[str]) -> None:
        """Drops tenants with nothing queued or running, so the table stays bounded; virtual
        times are relative, so they are rebased to keep the numbers small."""
        kept = {t: self._vtime[t] for t in set(keep) if t in self._vtime}
        base = min(kept.values(), default=0.0)
        self._vtime = {t: v - base for t, v in kept.items()}

    def order(self, items: Sequence[It], rank: Callable[[It], int]) -> list[It]:
        """`items` in the order the slots would go: highest `rank` (the aged priority) first,
        then the tenant whose turn it is, then arrival. Charges nothing."""
        queues: dict[str, list[It]] = {}
        for item in sorted(items, key=lambda p: (-rank(p), p.seq)):
            queues.setdefault(item.tenant, []).append(item)
        vtime = {t: self.vtime(t) for t in queues}
        heads = [(-rank(q[0]), vtime[t], q[0].seq, t) for t, q in queues.items()]
        heapq.heapify(heads)
        position = dict.fromkeys(queues, 0)
        out: list[It] = []
        while heads:
            _, _, _, tenant = heapq.heappop(heads)
            queue = queues[tenant]
            out.append(queue[position[tenant]])
            position[tenant] += 1
            vtime[tenant] += 1.0 / max(self.weight(tenant), 1e-6)
            if position[tenant] < len(queue):
                head = queue[position[tenant]]
                heapq.heappush(heads, (-rank(head), vtime[tenant], head.seq, tenant))
        return out

    def turn(self, tenants: Iterable[str]) -> float:
        """The least virtual time among `tenants`: a group holding the tenant whose turn it is
        goes first among groups of equal priority."""
        return min((self.vtime(t) for t in tenants), default=0.0)
