"""The whole-batch loop (`deadline` and `eager` policies) over the shared `RequestQueue`.

It knows nothing of HTTP or torch: a batch is handed to an async `runner` that returns one result
per payload.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

from .errors import BatchServeError, EngineOutOfMemory, GenerationFailed
from .request_queue import Clock, Group, Hooks, NullHooks, Outcome, Pending, QueueLoop

__all__ = ["Batcher", "Clock", "Hooks", "NullHooks", "Outcome", "Pending", "as_failure",
           "run_split"]

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("batchserve.batcher")

Runner = Callable[[list[T]], Awaitable[list[R]]]


async def run_split(runner: Runner[T, R], payloads: list[T]) -> list[tuple[R | Exception, int]]:
    """Runs `payloads` as one batch; on out-of-memory retries each half, down to single items.

    Returns one (result or exception, size of the batch that produced it) per payload.
    """
    try:
        results = await runner(payloads)
    except EngineOutOfMemory as exc:
        if len(payloads) == 1:
            return [(exc, 1)]
        mid = len(payloads) // 2
        log.warning("out of memory at batch size %d; retrying as %d + %d",
                    len(payloads), mid, len(payloads) - mid)
        return await run_split(runner, payloads[:mid]) + await run_split(runner, payloads[mid:])
    except Exception as exc:
        return [(exc, len(payloads))] * len(payloads)
    if len(results) != len(payloads):
        mismatch = RuntimeError(
            f"engine returned {len(results)} results for {len(payloads)} items"
        )
        return [(mismatch, len(payloads))] * len(payloads)
    return [(r, len(payloads)) for r in results]


def as_failure(exc: BaseException) -> BatchServeError:
    if isinstance(exc, BatchServeError):
        return exc
    if isinstance(exc, EngineOutOfMemory):
        return GenerationFailed("generation failed: out of device memory even at batch size 1")
    return GenerationFailed(f"generation failed ({type(exc).__name__}); see server logs")


class Batcher(QueueLoop[T, R]):
    """Runs one whole batch at a time from the shared `RequestQueue`.

    Guarantees: a batch never mixes keys and always holds at least one item; a group is due
    when full or when its oldest item waited `max_wait_s` (everything is due once closed);
    among due groups the highest aged priority goes first, then the oldest.
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
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                         max_queue=max_queue, aging_s=aging_s, clock=clock, hooks=hooks)
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
            batch = queue.take(key, self.max_batch_size, now)
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

    def _is_due(self, group: Group[T, R], now: float) -> bool:
        return (
            self.queue.closed
            or len(group.items) >= self.max_batch_size
            or now - group.oldest >= self.max_wait_s
        )

    def _pick(self, now: float) -> tuple[Hashable, str] | None:
        key = self.queue.best(now, lambda g: self._is_due(g, now))
        if key is None:
            return None
        if len(self.queue.groups[key].items) >= self.max_batch_size:
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
        try:
            outcomes = await run_split(self._runner, [p.payload for p in batch])
        finally:
            duration = self._clock() - start
            self.queue.note_service_time(duration, self.max_batch_size)
        images = 0
        for item, (result, size) in zip(batch, outcomes, strict=True):
            if item.future.cancelled():
                self._hooks.rejected("cancelled")
            elif item.future.done():
                pass  # already failed by a drain timeout
            elif isinstance(result, BaseException):
                if not isinstance(result, BatchServeError):
                    log.error("batch of %d failed", len(batch), exc_info=result)
                item.future.set_exception(as_failure(result))
                self._hooks.rejected("failed")
            else:
                images += 1
                item.future.set_result(Outcome(result, size, start - item.enqueued, duration))
        self.queue.release(batch)
        self._hooks.batch_finished(len(batch), duration, images)
