"""The whole-batch loop (`deadline` and `eager` policies) over the shared `RequestQueue`.

It knows nothing of HTTP or torch: a batch is handed to an async `runner` that returns one result
per payload; `retry.run_split` retries the parts that fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from .errors import BatchServeError, EngineOutOfMemory, GenerationFailed
from .request_queue import Clock, Group, Hooks, NullHooks, Outcome, Pending, QueueLoop
from .retry import Part, run_split

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


class Batcher(QueueLoop[T, R]):
    """Runs one whole batch at a time from the shared `RequestQueue`.

    Guarantees: a batch never mixes keys and always holds at least one item; a group is due
    when full (at its learned size limit, see `BatchSizes`) or when its oldest item waited
    `max_wait_s` (everything is due once closed); among due groups the highest aged priority goes
    first, then the oldest.
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
        key_label: Callable[[Hashable], str] = str,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                         max_queue=max_queue, aging_s=aging_s, clock=clock, hooks=hooks,
                         key_label=key_label)
        self._runner = runner

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
            batch = queue.take(key, self._limit(key), now)
            await self._expire_while_busy(asyncio.ensure_future(self._run_batch(batch, trigger)))

    async def _expire_while_busy(self, batch: asyncio.Future[None]) -> None:
        """Waits for `batch`, meanwhile answering queued items that time out or are cancelled
        when that happens rather than when the batch ends (a GPU batch can take many seconds).
        Re-raises the batch's own exception; cancelling the wait cancels the batch."""
        queue = self.queue
        try:
            while not batch.done():
                queue.wake.clear()
                queue.purge(self._clock())
                deadline = queue.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - self._clock())
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

    def _limit(self, key: Hashable) -> int:
        """The most items of `key` one batch takes: the setting, or less where a larger batch
        of this key ran out of memory (`BatchSizes`)."""
        return min(self.max_batch_size, self.sizes.limit(key))

    def _is_due(self, key: Hashable, group: Group[T, R], now: float) -> bool:
        return (
            self.queue.closed
            or len(group.items) >= self._limit(key)
            or now - group.oldest >= self.max_wait_s
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

    async def _run_batch(self, batch: list[Pending[T, R]], trigger: str) -> None:
        start = self._clock()
        self._hooks.batch_started(len(batch), trigger, [start - p.enqueued for p in batch])
        delivered = [False] * len(batch)

        def deliver(part: Part[R]) -> None:
            for n in part.indices:
                delivered[n] = True
            self._deliver(batch, part)

        try:
            await run_split(
                self._runner, [p.payload for p in batch], deliver, clock=self._clock,
                wanted=lambda n: not batch[n].future.done(),
                sizes=self.key_sizes(batch[0].key),
            )
        except BaseException:  # the loop dies or is stopped: answer here, fail_all can't see it
            self.fail_all(GenerationFailed("the batch loop stopped; the server is restarting"))
            raise
        for n, done in enumerate(delivered):
            if not done and batch[n].future.cancelled():  # its client left before its part ran
                self._hooks.rejected("cancelled")
        duration = self._clock() - start
        self.queue.note_service_time(duration, self.max_batch_size)
        self.queue.release(batch)
        self._hooks.batch_finished(len(batch), duration, sum(delivered))

    def _deliver(self, batch: list[Pending[T, R]], part: Part[R]) -> None:
        """Answers one part's items the moment it ends: X-Batch-Size is the size that made the
        image, X-Queue-Ms runs until that part started."""
        error = part.error
        if error is not None and not isinstance(error, BatchServeError | EngineOutOfMemory):
            log.error("batch of %d failed", part.size, exc_info=error)
        for n, index in enumerate(part.indices):
            item = batch[index]
            if item.future.cancelled():
                self._hooks.rejected("cancelled")
            elif item.future.done():
                pass  # already answered by a drain cut-off or fail_all (and counted there)
            elif error is not None or part.results is None:
                failure = as_failure(error or RuntimeError("no result"))
                item.future.set_exception(failure)
                self._hooks.rejected(failure.reject_reason or "failed")
            else:
                item.future.set_result(Outcome(
                    part.results[n], part.size, part.started - item.enqueued, part.seconds
                ))

