"""Bounds each engine call by a multiple of the time predicted from the calls measured so far.

A CUDA call that hangs never returns and cannot be interrupted from Python; its clients would
wait forever while `/healthz` says all is well. The watchdog gives up on such a call: the caller
fails the batch's requests, turns unhealthy and ends the process for the orchestrator to restart
(see `Service._engine_hung`).

Predictions are per unit of work (pixels x steps x images): one rate, so a shape seen for the
first time is bounded too. The first rate comes from the warm-up, which includes the one-time
costs of a first call, so the bound starts lenient and tightens as batches are measured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from ..errors import EngineHung

T = TypeVar("T")
Clock = Callable[[], float]


class Watchdog:
    def __init__(self, *, factor: float, min_s: float, clock: Clock = time.monotonic) -> None:
        self.factor = factor  # 0: off
        self.min_s = min_s
        self.clock = clock
        self.rate_s: float | None = None  # seconds per unit of work, smoothed
        self._wakers: set[asyncio.Future[None]] = set()  # one per guard waiting

    @property
    def enabled(self) -> bool:
        return self.factor > 0

    def bound_s(self, work: float) -> float:
        """How long an engine call of `work` units may run: `factor` times its predicted time,
        never under `min_s`."""
        predicted = 0.0 if self.rate_s is None else self.rate_s * work
        return max(self.min_s, self.factor * predicted)

    def measured(self, work: float, seconds: float) -> None:
        if work <= 0 or seconds <= 0:
            return
        rate = seconds / work
        self.rate_s = rate if self.rate_s is None else 0.8 * self.rate_s + 0.2 * rate

    def poke(self) -> None:
        """Re-check the clock now (tests call it after advancing an injected clock)."""
        for waker in list(self._wakers):
            _resolve(waker)

    async def guard(self, call: Awaitable[T], work: float,
                    done_work: Callable[[T], float] | None = None) -> T:
        """Awaits `call`; raises `EngineHung` once it has run past its bound (`call` is then
        abandoned: the thread running it cannot be stopped). Measures it when it ends, by
        `done_work(result)` when given (a call that may stop early is bounded by the most work
        it may do, but measured by what it did)."""
        task = asyncio.ensure_future(call)
        loop = asyncio.get_running_loop()
        started = self.clock()
        bound = self.bound_s(work)
        try:
            while not task.done():
                now = self.clock()
                if self.enabled and now - started >= bound:
                    raise EngineHung(
                        f"the engine did not finish this batch within {bound:.0f} s; the "
                        "server is restarting", retry_after_s=5,
                    )
                # One plain future that the call's end, a poke or the bound resolves: no waker
                # task and no `asyncio.wait` per call (`continuous` may make one call per step).
                waker: asyncio.Future[None] = loop.create_future()
                done = partial(_resolve, waker)
                task.add_done_callback(done)
                timer = (loop.call_later(started + bound - now, _resolve, waker)
                         if self.enabled else None)
                self._wakers.add(waker)
                try:
                    await waker
                finally:
                    self._wakers.discard(waker)
                    task.remove_done_callback(done)
                    if timer is not None:
                        timer.cancel()
        except BaseException:
            task.cancel()
            raise
        result = task.result()
        self.measured(work if done_work is None else done_work(result), self.clock() - started)
        return result


def _resolve(waker: asyncio.Future[None], *_: object) -> None:
    if not waker.done():
        waker.set_result(None)
