"""The one request queue behind every flush policy: admission, pending items by key, purge of
timed-out and cancelled items, picking by priority with aging, in-flight tracking and drain.

The loops that decide *when* to run (`batcher.Batcher` for whole batches, `stepper.StepBatcher`
for denoising steps) share it, so these guarantees are written once. It knows nothing of HTTP or
torch: items are opaque payloads with a key, a priority and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import Generic, Protocol, TypeVar

from ..errors import BatchServeError, Draining, QueueFull, QueueTimeout
from .batchsize import BatchSizes
from .fair import FairShare

T = TypeVar("T")
R = TypeVar("R")
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Outcome(Generic[R]):
    result: R
    batch_size: int
    queue_s: float
    inference_s: float


@dataclass(eq=False, slots=True)
class Pending(Generic[T, R]):
    payload: T
    key: Hashable
    priority: int
    enqueued: float
    deadline: float
    seq: int
    future: asyncio.Future[Outcome[R]]
    budget_end: float = math.inf
    """When its client is predicted to stop waiting: `deadline`, or sooner by learned patience
    when the client named no timeout of its own."""
    teaches_patience: bool = False
    """Its client named no timeout: the age at which it gives up is what patience learns."""
    tenant: str = ""
    """Whose it is (a name from the tenants file, `""` without one): fair shares."""

    def effective_priority(self, now: float, aging_s: float) -> int:
        return self.priority + int((now - self.enqueued) // aging_s)


_SEQ = attrgetter("seq")


@dataclass(eq=False, slots=True)
class Group(Generic[T, R]):
    """The pending items of one key."""

    items: list[Pending[T, R]] = field(default_factory=list)

    @property
    def oldest(self) -> float:
        return min(p.enqueued for p in self.items)

    def priority(self, now: float, aging_s: float) -> int:
        return max(p.effective_priority(now, aging_s) for p in self.items)


class Hooks(Protocol):
    """Observation points. Implementations must not raise (see `metrics.Metrics`)."""

    def queue_depth(self, depth: int) -> None: ...

    def batch_started(self, size: int, trigger: str, waits_s: Sequence[float]) -> None: ...

    def batch_finished(self, size: int, duration_s: float, images: int) -> None: ...

    def rejected(self, reason: str) -> None: ...

    def wasted(self, reason: str) -> None: ...

    def batch_interrupted(self) -> None: ...

    def key_state(self, label: str, cap: int, patience_s: float | None) -> None: ...

    def key_forgotten(self, label: str) -> None: ...

    def step(self, size: int) -> None: ...

    def active_items(self, count: int) -> None: ...

    def size_limit(self, key: str, limit: int) -> None:
        """The learned batch size limit of a key changed (`key` is its label, no user text)."""
        ...


class NullHooks:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_started(self, size: int, trigger: str, waits_s: Sequence[float]) -> None:
        pass

    def batch_finished(self, size: int, duration_s: float, images: int) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def wasted(self, reason: str) -> None:
        pass

    def batch_interrupted(self) -> None:
        pass

    def key_state(self, label: str, cap: int, patience_s: float | None) -> None:
        pass

    def key_forgotten(self, label: str) -> None:
        pass

    def step(self, size: int) -> None:
        pass

    def active_items(self, count: int) -> None:
        pass

    def size_limit(self, key: str, limit: int) -> None:
        pass


class RequestQueue(Generic[T, R]):
    """Pending items grouped by key, plus the items a loop has taken and not yet released.

    Guarantees: every submitted future is resolved exactly once (by the loop that took it, by a
    purge as `QueueTimeout`, by `fail_all`, or cancelled by its owner); nothing is admitted
    after `close`; `idle` is set exactly when nothing is pending or in flight. Priority ages by
    +1 per `aging_s` waited, so no key starves behind a stream of higher-priority work.
    """

    def __init__(
        self,
        *,
        max_queue: int = 256,
        aging_s: float = 5.0,
        clock: Clock = time.monotonic,
        hooks: Hooks | None = None,
        fair: FairShare | None = None,
    ) -> None:
        self.max_queue = max_queue
        self.fair = fair or FairShare()
        self.aging_s = aging_s
        self.clock = clock
        self.hooks: Hooks = hooks or NullHooks()
        self.groups: dict[Hashable, Group[T, R]] = {}
        self.inflight: list[Pending[T, R]] = []
        self.wake = asyncio.Event()
        self.changed = asyncio.Event()
        """Set with `wake` by everything but a plain submission (a cancellation, a requeue, a
        close, a drain, a poke): what a running batch with no free slot must stop for, since a
        newcomer cannot join it anyway (`stepper.StepBatcher`). Cleared by whoever clears
        `wake` and reads it."""
        self.idle = asyncio.Event()
        self.idle.set()
        self._seq = 0
        self._depth = 0
        self._closed = False
        self._slot_s_ema: float | None = None
        self._slots = 1
        self.on_item_done: Callable[[Pending[T, R]], None] = lambda item: None
        """Called when an item's future is resolved or cancelled (the loop's own bookkeeping)."""

    # -- admission -------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Queued items (not counting those in flight)."""
        return self._depth

    @property
    def closed(self) -> bool:
        return self._closed

    def check_admission(self) -> None:
        """Raises `Draining` once closed, `QueueFull` at `max_queue` queued."""
        if self._closed:
            raise Draining("server is shutting down", retry_after_s=5)
        if self._depth >= self.max_queue:
            raise QueueFull(
                f"queue is full ({self.max_queue} requests waiting)",
                retry_after_s=self.retry_after_s(),
            )

    def submit(
        self, payload: T, *, key: Hashable, priority: int = 0, timeout_s: float = 300.0,
        budget_s: float | None = None, teaches_patience: bool = False, tenant: str = "",
    ) -> asyncio.Future[Outcome[R]]:
        self.check_admission()
        now = self.clock()
        active = self.tenants()
        if tenant not in active:
            self.fair.activate(tenant, active)
        future: asyncio.Future[Outcome[R]] = asyncio.get_running_loop().create_future()
        self._seq += 1
        item = Pending(payload, key, priority, now, now + timeout_s, self._seq, future,
                       now + (timeout_s if budget_s is None else budget_s), teaches_patience,
                       tenant)
        self.groups.setdefault(key, Group()).items.append(item)
        future.add_done_callback(partial(self._on_done, item))
        self._set_depth(self._depth + 1)
        self.idle.clear()
        self.wake.set()
        return future

    def tenants(self) -> set[str]:
        """Tenants with work queued or in flight."""
        return ({p.tenant for g in self.groups.values() for p in g.items}
                | {p.tenant for p in self.inflight})

    def queued_by(self, tenant: str) -> int:
        """Items of `tenant` queued or in flight (what its `max_queued` bounds)."""
        return (sum(p.tenant == tenant for g in self.groups.values() for p in g.items)
                + sum(p.tenant == tenant for p in self.inflight))

    def ordered(self, key: Hashable, now: float) -> list[Pending[T, R]]:
        """The items of `key` in the order slots go to them (aged priority, then the tenants'
        fair turns, then arrival); the group is left in that order."""
        group = self.groups.get(key)
        if group is None:
            return []
        items = group.items
        cap = self._cap()
        if all(p.priority == cap for p in items) and len({p.tenant for p in items}) == 1:
            # Everyone at the top priority already (aging lifts nobody past the cap) and one
            # tenant (no turns): arrival order. The common case, and per round of `continuous`
            # at saturation the full ordering below is ~1 ms for 500 queued on a CPU.
            items.sort(key=_SEQ)
            return items
        group.items = self.fair.order(items, self._rank(now, cap))
        return group.items

    def _cap(self) -> int:
        return max((p.priority for g in self.groups.values() for p in g.items), default=0)

    def _rank(self, now: float, cap: int | None = None) -> Callable[[Pending[T, R]], int]:
        """Aged priority, capped at the highest priority asked for by anything queued: aging
        lifts old work level with the most urgent (it cannot starve), never above it, so a
        tenant's backlog does not outrank another tenant's fresh work of the same priority just
        by being old; among equals the fair turn decides."""
        top = self._cap() if cap is None else cap
        return lambda p: min(top, p.effective_priority(now, self.aging_s))

    def note_service_time(self, seconds: float, slots: int) -> None:
        """Records how long one round of `slots` concurrent items took (for `Retry-After`)."""
        prev = self._slot_s_ema
        self._slot_s_ema = seconds if prev is None else 0.8 * prev + 0.2 * seconds
        self._slots = max(1, slots)

    def retry_after_s(self) -> int:
        """Seconds until the queue ahead has likely cleared, from recent service times."""
        round_s = self._slot_s_ema if self._slot_s_ema is not None else 1.0
        rounds_ahead = math.ceil(max(self._depth, 1) / self._slots)
        return max(1, math.ceil(rounds_ahead * round_s))

    def _stir(self) -> None:
        self.changed.set()
        self.wake.set()

    def poke(self) -> None:
        """Re-evaluate now (tests call it after advancing an injected clock)."""
        self._stir()

    def _on_done(self, item: Pending[T, R], future: asyncio.Future[Outcome[R]]) -> None:
        if future.cancelled():
            self._stir()
        self.on_item_done(item)

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self.hooks.queue_depth(depth)

    # -- what the loops call ---------------------------------------------------------------

    def purge(self, now: float) -> None:
        """Drops cancelled items and fails those past their deadline with `QueueTimeout`."""
        removed = 0
        for key in list(self.groups):
            group = self.groups[key]
            keep = []
            for item in group.items:
                if item.future.cancelled():
                    self.hooks.rejected("cancelled")
                elif item.deadline <= now:
                    waited = now - item.enqueued
                    item.future.set_exception(
                        QueueTimeout(f"waited {waited:.1f} s in the queue, past its timeout")
                    )
                    self.hooks.rejected("timeout")
                else:
                    keep.append(item)
                    continue
                removed += 1
            if keep:
                group.items = keep
            else:
                del self.groups[key]
        if removed:
            self._set_depth(self._depth - removed)
        self._settle()

    def best(
        self, now: float, eligible: Callable[[Group[T, R]], bool] = lambda g: True
    ) -> Hashable | None:
        """The eligible key with the highest (aged) priority, then the one holding the tenant
        whose turn it is (see `fair`), then the oldest item."""
        keys = [k for k, g in self.groups.items() if eligible(g)]
        if not keys:
            return None
        rank = self._rank(now)
        return min(keys, key=lambda k: (-max(map(rank, self.groups[k].items)),
                                        self.fair.turn(p.tenant for p in self.groups[k].items),
                                        self.groups[k].oldest))

    def take(self, key: Hashable, count: int, now: float) -> list[Pending[T, R]]:
        """Moves up to `count` items of `key` in flight: highest aged priority first, then the
        tenants' fair turns, then FIFO."""
        group = self.groups.get(key)
        if group is None or count <= 0:
            return []
        self.ordered(key, now)
        taken, group.items = group.items[:count], group.items[count:]
        self.fair.charge(taken)
        if not group.items:
            del self.groups[key]
        self._set_depth(self._depth - len(taken))
        self.inflight.extend(taken)
        return taken

    def take_items(self, key: Hashable, chosen: list[Pending[T, R]]) -> list[Pending[T, R]]:
        """Moves the `chosen` items of `key` (picked by the loop) in flight, in that order."""
        group = self.groups.get(key)
        if group is None or not chosen:
            return []
        ids = {id(p) for p in chosen}
        group.items = [p for p in group.items if id(p) not in ids]
        if not group.items:
            del self.groups[key]
        self._set_depth(self._depth - len(chosen))
        self.inflight.extend(chosen)
        self.fair.charge(chosen)
        return chosen

    def refuse(self, key: Hashable, items: list[Pending[T, R]], error: BatchServeError,
               reason: str) -> None:
        """Answers queued `items` of `key` with `error` at once (counted under `reason`)."""
        group = self.groups.get(key)
        if group is None or not items:
            return
        ids = {id(p) for p in items}
        group.items = [p for p in group.items if id(p) not in ids]
        if not group.items:
            del self.groups[key]
        self._set_depth(self._depth - len(items))
        for item in items:
            item.future.set_exception(error)
            self.hooks.rejected(reason)
        self._settle()

    def requeue(self, items: Iterable[Pending[T, R]]) -> None:
        """Puts in-flight items back as they were queued (same age, priority and deadline)."""
        back = [p for p in items if p in self.inflight]
        self.release(back)
        open_items = [p for p in back if not p.future.done()]
        for item in open_items:
            self.groups.setdefault(item.key, Group()).items.append(item)
        if open_items:
            self._set_depth(self._depth + len(open_items))
            self.idle.clear()
            self._stir()
        self._settle()

    def release(self, items: Iterable[Pending[T, R]]) -> None:
        """Items the loop is done with (their futures resolved or cancelled)."""
        gone = set(map(id, items))
        self.inflight = [p for p in self.inflight if id(p) not in gone]
        self._settle()

    def next_deadline(self) -> float | None:
        return min((p.deadline for g in self.groups.values() for p in g.items), default=None)

    def empty(self) -> bool:
        return not self.groups and not self.inflight

    def _settle(self) -> None:
        if self.empty():
            self.idle.set()
            self.fair.forget(())

    async def wait(self, until: float | None) -> None:
        """Sleeps until something is submitted or cancelled, `poke`, or the clock reaches
        `until` (None: no time limit)."""
        timeout = None if until is None else max(0.0, until - self.clock())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stops admitting; the loops then run everything queued without waiting to fill."""
        self._closed = True
        self._stir()

    async def drain(self, timeout_s: float) -> bool:
        """Closes, then waits for queued and in-flight work; what is left after `timeout_s`
        fails with `Draining`. Returns True when everything finished in time."""
        self.close()
        try:
            await asyncio.wait_for(self.idle.wait(), timeout_s)
            return True
        except TimeoutError:
            self.fail_all(Draining("server shut down before this request could run"))
            return False

    def fail_all(self, error: BatchServeError) -> None:
        """Fails every queued and in-flight future that is still open."""
        pending = [p for g in self.groups.values() for p in g.items] + self.inflight
        self.groups.clear()
        self.inflight = []
        self._set_depth(0)
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)
                self.hooks.rejected(_reject_reason(error))
        self.idle.set()
        self._stir()


def _reject_reason(error: BatchServeError) -> str:
    """A drain cut-off is its own outcome (`drained`): the client did not leave (`cancelled`)
    and nothing failed; the server stopped before the request's turn."""
    if isinstance(error, Draining):
        return "drained"
    return error.reject_reason or "failed"


class QueueLoop(Generic[T, R]):
    """What the service calls, whatever the policy: admission and shutdown go to the one
    `RequestQueue`; subclasses implement `run`, the loop that decides what runs when."""

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        aging_s: float,
        clock: Clock,
        hooks: Hooks | None,
        key_label: Callable[[Hashable], str] = str,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue: RequestQueue[T, R] = RequestQueue(
            max_queue=max_queue, aging_s=aging_s, clock=clock, hooks=hooks
        )
        self._clock = clock
        self._hooks = self.queue.hooks
        self.key_label = key_label
        # One out-of-memory table for every policy: the largest batch (or step) per key.
        self.sizes = BatchSizes(
            max_batch_size, on_change=lambda key, n: self._hooks.size_limit(key_label(key), n)
        )

    def key_sizes(self, key: Hashable) -> KeySizes:
        """`sizes` as one batch of `key` reports to it."""
        return KeySizes(self.sizes, key)

    @property
    def depth(self) -> int:
        """Queued items (not counting those in flight)."""
        return self.queue.depth

    @property
    def closed(self) -> bool:
        return self.queue.closed

    def submit(
        self, payload: T, *, key: Hashable, priority: int = 0, timeout_s: float = 300.0,
        explicit_timeout: bool = True, tenant: str = "",
    ) -> asyncio.Future[Outcome[R]]:
        """Queues one item; `explicit_timeout=False`: its client named no timeout (what the
        whole-batch loop's learned patience uses)."""
        return self.queue.submit(payload, key=key, priority=priority, timeout_s=timeout_s,
                                 tenant=tenant)

    def should_stop(self) -> Callable[[], bool]:
        """For the engine call now starting: true once nobody waits for its result."""
        return lambda: False

    def retry_after_s(self) -> int:
        return self.queue.retry_after_s()

    def poke(self) -> None:
        self.queue.poke()

    def close(self) -> None:
        self.queue.close()

    async def drain(self, timeout_s: float) -> bool:
        return await self.queue.drain(timeout_s)

    def fail_all(self, error: BatchServeError) -> None:
        self.queue.fail_all(error)

    async def run(self) -> None:
        raise NotImplementedError


class KeySizes:
    """`BatchSizes` seen by one batch: which key its sizes are reported under."""

    def __init__(self, sizes: BatchSizes, key: Hashable) -> None:
        self._sizes, self._key = sizes, key

    def fitted(self, size: int) -> None:
        self._sizes.fitted(self._key, size)

    def out_of_memory(self, size: int) -> None:
        self._sizes.out_of_memory(self._key, size)
