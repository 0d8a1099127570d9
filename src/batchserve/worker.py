"""One dedicated daemon thread that runs blocking calls in submission order.

A daemon thread (not a ThreadPoolExecutor, whose threads are joined at exit) so that a hung
engine call cannot hold the process open. A call that merely runs is interrupted and joined
(`stop`): native code (torch) still running on a thread while the interpreter finalizes aborts
the process (SIGABRT, "terminate called without an active exception").
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class Worker:
    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.shield(self.submit(fn))

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Queues `fn` now and returns its future (no task to start: cheaper than `run` for a
        caller that makes one call per denoising step). Cancelling the future does not stop
        `fn`; its result is then dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        # Whoever awaited may be gone (cancelled at shutdown) when an engine call ends in an
        # exception (an interrupted batch): mark it retrieved so asyncio does not log it.
        future.add_done_callback(_retrieve)
        self._jobs.put((fn, loop, future))
        return future

    def stop(self) -> None:
        """No more calls: the thread ends once the queued ones ran."""
        self._jobs.put(None)

    def join(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for the thread to end (after `stop`); True once it has.
        Blocking: call it off the event loop."""
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            _run(*job)
            # The loop's own variables must not keep the last job (its batch's inputs, images
            # or exception) alive while the thread waits for the next one.
            del job


def _run(fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]
         ) -> None:
    try:
        result = fn()
    except BaseException as exc:  # handed to the awaiting coroutine, never lost
        _deliver(loop, future.set_exception, future, exc)
    else:
        _deliver(loop, future.set_result, future, result)


def _deliver(
    loop: asyncio.AbstractEventLoop,
    setter: Callable[[Any], None],
    future: asyncio.Future[Any],
    value: Any,
) -> None:
    def apply() -> None:
        if not future.done():
            setter(value)

    if not loop.is_closed():
        loop.call_soon_threadsafe(apply)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
