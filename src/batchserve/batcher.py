"""The scheduler: a keyed priority queue of pending requests and the loop that flushes batches.

It knows nothing of HTTP or torch: items are opaque payloads with a key, a priority and a
deadline; a batch is handed to an async `runner` that returns one result per payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from .adaptive import Adaptive
from .batchsize import BatchSizes
from .deadlines import Deadlines, InEngine
from .errors import (
    BatchServeError,
    CannotFinish,
    Draining,
    EngineOutOfMemory,
    GenerationFailed,
    Interrupted,
    QueueFull,
    QueueTimeout,
)
from .retry import Part, run_split

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("batchserve.batcher")

Clock = Callable[[], float]
Runner = Callable[[list[T]], Awaitable[list[R]]]


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

    def effective_priority(self, now: float, aging_s: float) -> int:
        return self.priority + int((now - self.enqueued) // aging_s)


@dataclass(eq=False, slots=True)
class _Group(Generic[T, R]):
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

    def size_limit(self, key: str, limit: int) -> None:
        pass


@dataclass(eq=False, slots=True)
class _Running(Generic[T, R]):
    """The batch in the engine. It runs as one or more parts (`retry.run_split`); `stop` belongs
    to the part now running and is set (and read by the engine thread between steps) once no
    member of that part has anyone waiting for it."""

    items: list[Pending[T, R]]
    started: float
    part: tuple[int, ...] = ()
    stop: threading.Event = field(default_factory=threading.Event)
    left: int = 0  # members whose clients left or timed out while it ran

    def starting(self, indices: tuple[int, ...]) -> None:
        self.part, self.stop = indices, threading.Event()

    def abandoned(self) -> bool:
        return all(p.future.done() for p in self.items)


def _wasted_reason(exc: BaseException | None) -> str:
    return "timeout" if isinstance(exc, QueueTimeout) else "drain"


def _as_failure(exc: BaseException) -> BatchServeError:
    if isinstance(exc, BatchServeError):
        return exc
    if isinstance(exc, EngineOutOfMemory):
        return GenerationFailed("generation failed: out of device memory even at batch size 1")
    return GenerationFailed(f"generation failed ({type(exc).__name__}); see server logs")


class Batcher(Generic[T, R]):
    """Groups submitted items by key and runs one batch at a time.

    Guarantees: a batch never mixes keys and always holds at least one item; every submitted
    future is resolved exactly once (result, domain error, or cancelled by its owner); a group
    is due when full (its key's cap) or when its oldest item waited `max_wait_s`; among due
    groups the highest priority goes first, then the oldest. Priority ages by +1 per `aging_s`
    waited, so no key starves behind a stream of higher-priority work. `timeout_s` bounds queue
    plus generation. Once every member of the running batch is cancelled or answered,
    `should_stop()` of that batch turns true, and a drain no longer waits for it.

    With `adaptive` enabled (see `adaptive.Adaptive`), a request predicted to finish past its
    budget is refused at submit, and batches are capped to what their members' budgets allow.
    """

    def __init__(
        self,
        runner: Runner[T, R],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.5,
        max_queue: int = 256,
        aging_s: float = 5.0,
        clock: Clock = time.monotonic,
        hooks: Hooks | None = None,
        adaptive: Adaptive | None = None,
        key_label: Callable[[Hashable], str] = str,
    ) -> None:
        self._runner = runner
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._aging_s = aging_s
        self._clock = clock
        self._hooks: Hooks = hooks or NullHooks()
        self.key_label = key_label
        self.sizes = BatchSizes(
            max_batch_size, on_change=lambda key, n: self._hooks.size_limit(key_label(key), n)
        )
        self._groups: dict[Hashable, _Group[T, R]] = {}
        self._inflight: list[Pending[T, R]] = []
        self._running: _Running[T, R] | None = None
        self.adaptive = adaptive or Adaptive(max_batch_size=max_batch_size, enabled=False)
        # One batch size per key for every decision (due-ness, take, predictions): the least
        # of --max-batch-size, the learned out-of-memory limit and (adaptive) the AIMD cap.
        self.adaptive.size_limit = self.sizes.limit
        self._deadlines = Deadlines(self.adaptive, max_wait_s, aging_s)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._seq = 0
        self._depth = 0
        self._closed = False
        self._batch_s_ema: float | None = None

    # -- admission -------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Queued items (not counting the batch in flight)."""
        return self._depth

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(
        self, payload: T, *, key: Hashable, priority: int = 0, timeout_s: float = 300.0,
        explicit_timeout: bool = True,
    ) -> asyncio.Future[Outcome[R]]:
        """Queues one item. `explicit_timeout=False` says its client named no timeout: a learned
        patience may stand in for it as the budget (never beyond `timeout_s`), and the age at
        which it is cancelled is what that patience learns from.

        Raises `Draining`, `QueueFull`, or (adaptive only) `CannotFinish` / `Overloaded` when it
        is predicted to finish past its budget; nothing refused is queued."""
        if self._closed:
            raise Draining("server is shutting down", retry_after_s=5)
        if self._depth >= self.max_queue:
            raise QueueFull(
                f"queue is full ({self.max_queue} requests waiting)",
                retry_after_s=self.retry_after_s(),
            )
        now = self._clock()
        budget_s = self._deadlines.budget_s(key, now, timeout_s, explicit_timeout)
        if self.adaptive.enabled:
            self._deadlines.admit(key, priority, now, timeout_s, budget_s, explicit_timeout,
                                  self._in_engine(), self._queued())
        future: asyncio.Future[Outcome[R]] = asyncio.get_running_loop().create_future()
        self._seq += 1
        item = Pending(payload, key, priority, now, now + timeout_s, self._seq, future,
                       now + budget_s, not explicit_timeout)
        self._groups.setdefault(key, _Group()).items.append(item)
        future.add_done_callback(partial(self._on_done, item))
        self._set_depth(self._depth + 1)
        self._idle.clear()
        self._wake.set()
        return future

    def retry_after_s(self) -> int:
        """Seconds until the queue ahead has likely cleared, from recent batch times."""
        batch_s = self._batch_s_ema if self._batch_s_ema is not None else 1.0
        batches_ahead = math.ceil(max(self._depth, 1) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * batch_s))

    def _in_engine(self) -> InEngine | None:
        running = self._running
        if running is None:
            return None
        return InEngine(running.items[0].key, len(running.items), running.started)

    def _queued(self) -> dict[Hashable, list[Pending[T, R]]]:
        return {k: g.items for k, g in self._groups.items()}

    def poke(self) -> None:
        """Re-evaluate the queue now (tests call it after advancing an injected clock)."""
        self._wake.set()

    def should_stop(self) -> Callable[[], bool]:
        """For the runner of the batch now starting: true once nobody waits for any of its
        items (cancelled, timed out, or failed by a drain). Safe to call from any thread."""
        running = self._running
        if running is None:
            return lambda: False
        return running.stop.is_set

    def _on_done(self, item: Pending[T, R], future: asyncio.Future[Outcome[R]]) -> None:
        now = self._clock()
        if future.cancelled():
            self._wake.set()
            if item.teaches_patience:
                self.adaptive.gave_up(item.key, now - item.enqueued, now)
        running = self._running
        if running is None or not any(p is item for p in running.items):
            return
        if future.cancelled() or isinstance(future.exception(), QueueTimeout):
            running.left += 1
        if running.part and all(running.items[i].future.done() for i in running.part):
            running.stop.set()
        if running.abandoned():
            self._settle_if_abandoned()

    def _settle_if_abandoned(self) -> None:
        """A drain does not wait for a running batch nobody waits for."""
        running = self._running
        if self._closed and not self._groups and running is not None and running.abandoned():
            self._idle.set()

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        self._hooks.queue_depth(depth)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Flushes batches until closed and empty. Exceptions inside a batch never end it."""
        while True:
            self._wake.clear()
            now = self._clock()
            self._purge(now)
            if not self._groups:
                self._idle.set()
                if self._closed:
                    return
            picked = self._pick(now)
            if picked is None:
                await self._sleep_until(self._next_event(now), now)
                continue
            key, trigger = picked
            items = self._take(key, now)
            if not items:  # every item was refused as unreachable
                continue
            batch = asyncio.ensure_future(self._run_batch(items, trigger))
            await self._expire_while_busy(batch)

    async def _expire_while_busy(self, batch: asyncio.Future[None]) -> None:
        """Waits for `batch`, meanwhile answering queued items that time out or are cancelled
        when that happens rather than when the batch ends (a GPU batch can take many seconds).
        Re-raises the batch's own exception; cancelling the wait cancels the batch."""
        try:
            while not batch.done():
                self._wake.clear()
                now = self._clock()
                self._purge(now)
                self._expire_running(now)
                deadlines = [p.deadline for g in self._groups.values() for p in g.items]
                deadlines += [p.deadline for p in self._inflight if not p.future.done()]
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                waker: asyncio.Future[Any] = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait((batch, waker), timeout=timeout,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
        except asyncio.CancelledError:
            batch.cancel()
            raise
        batch.result()

    def _expire_running(self, now: float) -> None:
        for item in self._inflight:
            if not item.future.done() and item.deadline <= now:
                item.future.set_exception(QueueTimeout(
                    f"not finished {now - item.enqueued:.1f} s after admission, past its "
                    "timeout_s"))
                self._hooks.rejected("timeout")

    async def _sleep_until(self, when: float | None, now: float) -> None:
        timeout = None if when is None else max(0.0, when - now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _purge(self, now: float) -> None:
        removed = 0
        for key in list(self._groups):
            group = self._groups[key]
            keep = []
            for item in group.items:
                if item.future.cancelled():
                    self._hooks.rejected("cancelled")
                elif item.deadline <= now:
                    waited = now - item.enqueued
                    item.future.set_exception(
                        QueueTimeout(f"waited {waited:.1f} s in the queue, past its timeout")
                    )
                    self._hooks.rejected("timeout")
                else:
                    keep.append(item)
                    continue
                removed += 1
            if keep:
                group.items = keep
            else:
                del self._groups[key]
        if removed:
            self._set_depth(self._depth - removed)

    def _limit(self, key: Hashable) -> int:
        """The most items of `key` one batch takes: the setting, or less where a larger batch
        of this key ran out of memory (`BatchSizes`) or, adaptive, where its clients left
        (the AIMD cap); see `Adaptive.cap`."""
        return self.adaptive.cap(key)

    def _is_due(self, key: Hashable, group: _Group[T, R], now: float) -> bool:
        return (
            self._closed
            or len(group.items) >= self._limit(key)
            or now - group.oldest >= self.max_wait_s
            or (self.adaptive.enabled
                and self._deadlines.cannot_wait(key, group.items, group.oldest + self.max_wait_s))
        )

    def _pick(self, now: float) -> tuple[Hashable, str] | None:
        due = [(k, g) for k, g in self._groups.items() if self._is_due(k, g, now)]
        if not due:
            return None
        key, group = min(due, key=lambda kg: (-kg[1].priority(now, self._aging_s), kg[1].oldest))
        if len(group.items) >= self._limit(key):
            return key, "full"
        return key, "drain" if self._closed else "timeout"

    def _next_event(self, now: float) -> float | None:
        times = [g.oldest + self.max_wait_s for g in self._groups.values()]
        times += [p.deadline for g in self._groups.values() for p in g.items]
        return min(times, default=None)

    def _take(self, key: Hashable, now: float) -> list[Pending[T, R]]:
        group = self._groups[key]
        group.items.sort(key=lambda p: (-p.effective_priority(now, self._aging_s), p.seq))
        if self.adaptive.enabled:
            self._refuse_unreachable(key, group, now)
            batch = self._deadlines.fit(key, group.items, now)
            chosen = {id(p) for p in batch}
            group.items = [p for p in group.items if id(p) not in chosen]
        else:
            limit = self._limit(key)
            batch, group.items = group.items[:limit], group.items[limit:]
        if not group.items:
            del self._groups[key]
        self._set_depth(self._depth - len(batch))
        return batch

    def _refuse_unreachable(self, key: Hashable, group: _Group[T, R], now: float) -> None:
        """Answers at once the items that would miss their timeout_s even in a batch of one."""
        late = self._deadlines.unreachable(key, group.items, now)
        for item in late:
            item.future.set_exception(CannotFinish(
                "would finish past its timeout_s even alone; not started"))
            self._hooks.rejected("deadline")
        if late:
            gone = {id(p) for p in late}
            group.items = [p for p in group.items if id(p) not in gone]
            self._set_depth(self._depth - len(late))

    async def _run_batch(self, batch: list[Pending[T, R]], trigger: str) -> None:
        start = self._clock()
        key = batch[0].key
        running = _Running(batch, start)
        self._inflight, self._running = batch, running
        self._hooks.batch_started(len(batch), trigger, [start - p.enqueued for p in batch])
        delivered = [False] * len(batch)
        generated = interrupted = 0

        def deliver(part: Part[R]) -> None:
            nonlocal generated, interrupted
            for n in part.indices:
                delivered[n] = True
            if isinstance(part.error, Interrupted):
                interrupted += 1
            elif part.error is None and part.results is not None:
                generated += part.size
                self.adaptive.batch_ran(key, part.size, part.seconds)
            self._deliver(batch, part)

        try:
            await run_split(
                self._runner, [p.payload for p in batch], deliver, clock=self._clock,
                wanted=lambda n: not batch[n].future.done(), sizes=_KeySizes(self.sizes, key),
                starting=running.starting,
            )
        except BaseException:  # the loop dies or is stopped: answer here, fail_all can't see it
            self.fail_all(GenerationFailed("the batch loop stopped; the server is restarting"))
            raise
        finally:
            self._inflight, self._running = [], None
        for n, done in enumerate(delivered):
            if not done and batch[n].future.cancelled():  # its client left before its part ran
                self._hooks.rejected("cancelled")
        now = self._clock()
        duration = now - start
        if interrupted:
            self._hooks.batch_interrupted()
        else:
            self._note_batch_time(duration)
        self._hooks.batch_finished(len(batch), duration, generated)
        if generated or running.left:  # a failed batch says nothing about its clients' patience
            self.adaptive.batch_ended(key, len(batch), running.left, now)

    def _deliver(self, batch: list[Pending[T, R]], part: Part[R]) -> None:
        """Answers one part's items the moment it ends: X-Batch-Size is the size that made the
        image, X-Queue-Ms runs until that part started. An image made for nobody (its client
        left, timed out, or was cut off by a drain) is counted as wasted."""
        error = part.error
        if error is not None and not isinstance(
            error, BatchServeError | EngineOutOfMemory | Interrupted
        ):
            log.error("batch of %d failed", part.size, exc_info=error)
        made = error is None and part.results is not None
        for n, index in enumerate(part.indices):
            item = batch[index]
            if item.future.cancelled():
                self._hooks.rejected("cancelled")
                if made:
                    self._hooks.wasted("cancelled")
            elif item.future.done():  # timed out mid-batch, or cut off by a drain: counted there
                if made:
                    self._hooks.wasted(_wasted_reason(item.future.exception()))
            elif error is not None or part.results is None:
                failure = _as_failure(error or RuntimeError("no result"))
                item.future.set_exception(failure)
                self._hooks.rejected(failure.reject_reason or "failed")
            else:
                item.future.set_result(Outcome(
                    part.results[n], part.size, part.started - item.enqueued, part.seconds
                ))

    def _note_batch_time(self, seconds: float) -> None:
        prev = self._batch_s_ema
        self._batch_s_ema = seconds if prev is None else 0.8 * prev + 0.2 * seconds

    # -- shutdown --------------------------------------------------------------------------

    def close(self) -> None:
        """Stops admitting; everything queued becomes due at once (trigger `drain`)."""
        self._closed = True
        self._wake.set()
        self._settle_if_abandoned()

    async def drain(self, timeout_s: float) -> bool:
        """Closes, then waits for queued and in-flight work; what is left after `timeout_s`
        fails with `Draining`. Returns True when everything finished in time."""
        self.close()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except TimeoutError:
            self.fail_all(Draining("server shut down before this request could run"))
            return False

    def fail_all(self, error: BatchServeError) -> None:
        """Fails every queued and in-flight future that is still open."""
        pending = [p for g in self._groups.values() for p in g.items] + self._inflight
        self._groups.clear()
        self._set_depth(0)
        for item in pending:
            if not item.future.done():
                item.future.set_exception(error)
                self._hooks.rejected(_reject_reason(error))
        self._idle.set()


def _reject_reason(error: BatchServeError) -> str:
    """A drain cut-off is its own outcome (`drained`): the client did not leave (`cancelled`)
    and nothing failed; the server stopped before the request's turn."""
    if isinstance(error, Draining):
        return "drained"
    return error.reject_reason or "failed"


class _KeySizes:
    """`BatchSizes` seen by one batch: which key its sizes are reported under."""

    def __init__(self, sizes: BatchSizes, key: Hashable) -> None:
        self._sizes, self._key = sizes, key

    def fitted(self, size: int) -> None:
        self._sizes.fitted(self._key, size)

    def out_of_memory(self, size: int) -> None:
        self._sizes.out_of_memory(self._key, size)
