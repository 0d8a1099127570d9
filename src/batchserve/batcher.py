"""The whole-batch loop (`deadline` and `eager` policies) over the shared `RequestQueue`.

It knows nothing of HTTP or torch: a batch is handed to an async `runner` that returns one result
per payload; `retry.run_split` retries the parts that fail. With `adaptive` (issue 11) it also
refuses at admission what cannot finish in its budget, caps batches to their members' budgets,
and stops a running batch nobody waits for any more.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .errors import (
    BatchServeError,
    CannotFinish,
    EngineOutOfMemory,
    GenerationFailed,
    Interrupted,
    QueueTimeout,
)
from .sched.adaptive import Adaptive
from .sched.deadlines import Deadlines, InEngine
from .sched.request_queue import Clock, Group, Hooks, NullHooks, Outcome, Pending, QueueLoop
from .sched.retry import Part, run_split

__all__ = ["Batcher", "Clock", "Hooks", "NullHooks", "Outcome", "Pending", "as_failure"]

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("batchserve.batcher")

Runner = Callable[[list[T]], Awaitable[list[R]]]


def as_failure(exc: BaseException) -> BatchServeError:
    if isinstance(exc, BatchServeError):
        return exc
    if isinstance(exc, EngineOutOfMemory):
        return GenerationFailed("generation failed: out of device memory even at batch size 1")
    return GenerationFailed(f"generation failed ({type(exc).__name__}); see server logs")


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


class Batcher(QueueLoop[T, R]):
    """Runs one whole batch at a time from the shared `RequestQueue`.

    Guarantees: a batch never mixes keys and always holds at least one item; a group is due
    when full (its key's cap) or when its oldest item waited `max_wait_s` (everything is due
    once closed); among due groups the highest aged priority goes first, then the oldest.
    `timeout_s` bounds queue plus generation. Once every member of the running batch is
    cancelled or answered, `should_stop()` of that batch turns true, and a drain no longer waits
    for it.

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
        super().__init__(max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                         max_queue=max_queue, aging_s=aging_s, clock=clock, hooks=hooks,
                         key_label=key_label)
        self._runner = runner
        self._aging_s = aging_s
        self._running: _Running[T, R] | None = None
        self.adaptive = adaptive or Adaptive(max_batch_size=max_batch_size, enabled=False)
        # One batch size per key for every decision (due-ness, take, predictions): the least
        # of --max-batch-size, the learned out-of-memory limit and (adaptive) the AIMD cap.
        self.adaptive.size_limit = self.sizes.limit
        self._deadlines = Deadlines(self.adaptive, max_wait_s, aging_s)
        self.queue.on_item_done = self._on_item_done

    # -- admission -------------------------------------------------------------------------

    def submit(
        self, payload: T, *, key: Hashable, priority: int = 0, timeout_s: float = 300.0,
        explicit_timeout: bool = True, tenant: str = "",
    ) -> asyncio.Future[Outcome[R]]:
        """Queues one item. `explicit_timeout=False` says its client named no timeout: a learned
        patience may stand in for it as the budget (never beyond `timeout_s`), and the age at
        which it is cancelled is what that patience learns from.

        Raises `Draining`, `QueueFull`, or (adaptive only) `CannotFinish` / `Overloaded` when it
        is predicted to finish past its budget; nothing refused is queued."""
        self.queue.check_admission()
        now = self._clock()
        budget_s = self._deadlines.budget_s(key, now, timeout_s, explicit_timeout)
        if self.adaptive.enabled:
            self._deadlines.admit(key, priority, now, timeout_s, budget_s, explicit_timeout,
                                  self._in_engine(), self._queued())
        return self.queue.submit(payload, key=key, priority=priority, timeout_s=timeout_s,
                                 budget_s=budget_s, teaches_patience=not explicit_timeout,
                                 tenant=tenant)

    def _in_engine(self) -> InEngine | None:
        running = self._running
        if running is None:
            return None
        return InEngine(running.items[0].key, len(running.items), running.started)

    def _queued(self) -> dict[Hashable, list[Pending[T, R]]]:
        return {k: g.items for k, g in self.queue.groups.items()}

    def should_stop(self) -> Callable[[], bool]:
        """For the runner of the batch now starting: true once nobody waits for any of its
        items (cancelled, timed out, or failed by a drain). Safe to call from any thread."""
        running = self._running
        if running is None:
            return lambda: False
        return running.stop.is_set

    def _on_item_done(self, item: Pending[T, R]) -> None:
        future = item.future
        now = self._clock()
        if future.cancelled() and item.teaches_patience:
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
        if (self.queue.closed and not self.queue.groups and running is not None
                and running.abandoned()):
            self.queue.idle.set()

    def close(self) -> None:
        """Stops admitting; everything queued becomes due at once (trigger `drain`)."""
        self.queue.close()
        self._settle_if_abandoned()

    async def drain(self, timeout_s: float) -> bool:
        self.close()
        return await self.queue.drain(timeout_s)

    # -- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Flushes batches until closed and empty. Exceptions inside a batch never end it."""
        queue = self.queue
        while True:
            queue.wake.clear()
            now = self._clock()
            queue.purge(now)
            if queue.empty() and queue.closed:
                return
            picked = self._pick(now)
            if picked is None:
                await queue.wait(self._next_event())
                continue
            key, trigger = picked
            items = self._take(key, now)
            if not items:  # every item was refused as unreachable
                continue
            await self._expire_while_busy(asyncio.ensure_future(self._run_batch(items, trigger)))

    async def _expire_while_busy(self, batch: asyncio.Future[None]) -> None:
        """Waits for `batch`, meanwhile answering queued items that time out or are cancelled
        when that happens rather than when the batch ends (a GPU batch can take many seconds).
        Re-raises the batch's own exception; cancelling the wait cancels the batch."""
        queue = self.queue
        try:
            while not batch.done():
                queue.wake.clear()
                now = self._clock()
                queue.purge(now)
                self._expire_running(now)
                deadlines = [p.deadline for p in queue.inflight if not p.future.done()]
                deadline = queue.next_deadline()
                deadlines += [] if deadline is None else [deadline]
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                waker: asyncio.Future[Any] = asyncio.ensure_future(queue.wake.wait())
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
        for item in self.queue.inflight:
            if not item.future.done() and item.deadline <= now:
                item.future.set_exception(QueueTimeout(
                    f"not finished {now - item.enqueued:.1f} s after admission, past its "
                    "timeout_s"))
                self._hooks.rejected("timeout")

    def _limit(self, key: Hashable) -> int:
        """The most items of `key` one batch takes: the setting, or less where a larger batch
        of this key ran out of memory (`BatchSizes`) or, adaptive, where its clients left
        (the AIMD cap); see `Adaptive.cap`."""
        return self.adaptive.cap(key)

    def _is_due(self, key: Hashable, group: Group[T, R], now: float) -> bool:
        return (
            self.queue.closed
            or len(group.items) >= self._limit(key)
            or now - group.oldest >= self.max_wait_s
            or (self.adaptive.enabled
                and self._deadlines.cannot_wait(key, group.items, group.oldest + self.max_wait_s))
        )

    def _pick(self, now: float) -> tuple[Hashable, str] | None:
        groups = self.queue.groups
        due = {id(g) for k, g in groups.items() if self._is_due(k, g, now)}
        key = self.queue.best(now, lambda g: id(g) in due)
        if key is None:
            return None
        if len(groups[key].items) >= self._limit(key):
            return key, "full"
        return key, "drain" if self.queue.closed else "timeout"

    def _next_event(self) -> float | None:
        groups = self.queue.groups.values()
        times = [g.oldest + self.max_wait_s for g in groups]
        deadline = self.queue.next_deadline()
        return min([*times, *([] if deadline is None else [deadline])], default=None)

    def _take(self, key: Hashable, now: float) -> list[Pending[T, R]]:
        if not self.adaptive.enabled:
            return self.queue.take(key, self._limit(key), now)
        group = self.queue.groups[key]
        self.queue.ordered(key, now)
        late = self._deadlines.unreachable(key, group.items, now)
        self.queue.refuse(key, late, CannotFinish(
            "would finish past its timeout_s even alone; not started"), "deadline")
        group = self.queue.groups.get(key, group)
        return self.queue.take_items(key, self._deadlines.fit(key, group.items, now))

    async def _run_batch(self, batch: list[Pending[T, R]], trigger: str) -> None:
        start = self._clock()
        key = batch[0].key
        running = _Running(batch, start)
        self._running = running
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
                wanted=lambda n: not batch[n].future.done(), sizes=self.key_sizes(key),
                starting=running.starting,
            )
        except BaseException:  # the loop dies or is stopped: answer here, fail_all can't see it
            self.fail_all(GenerationFailed("the batch loop stopped; the server is restarting"))
            raise
        finally:
            self._running = None
            self.queue.release(batch)
        for n, done in enumerate(delivered):
            if not done and batch[n].future.cancelled():  # its client left before its part ran
                self._hooks.rejected("cancelled")
        now = self._clock()
        duration = now - start
        if interrupted:
            self._hooks.batch_interrupted()
        else:
            self.queue.note_service_time(duration, self.max_batch_size)
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
                failure = as_failure(error or RuntimeError("no result"))
                item.future.set_exception(failure)
                self._hooks.rejected(failure.reject_reason or "failed")
            else:
                item.future.set_result(Outcome(
                    part.results[n], part.size, part.started - item.enqueued, part.seconds
                ))
