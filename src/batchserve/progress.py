"""Where the engine's steps meet the people waiting: the latest progress of each running request,
by key (a job's id, or a request's own id), and who is listening.

The engine thread writes (`put`, once per denoising step of a batch that has keyed items); the
event loop reads (`get`, `changed`). Only the latest state is kept per key, so a listener that
reads slowly, or not at all, never holds anything up: it sees the newest step when it reads,
and progress it missed is simply gone (its terminal event comes from the job record, never from
here). Previews (a small JPEG per item, `engines.preview`) are made only for keys someone
listens to, every `preview_every` steps: a server nobody watches pays one dict write per step.

With `--role api` and `--role worker` apart, the worker mirrors its keys' progress into the
shared queue backend (`mirror`), and the API process reads it from there (`jobs.redis`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

Clock = Callable[[], float]


BATCH = "batch"
"""The running batch's own key: its furthest item (what A1111's `/sdapi/v1/progress` shows)."""


@dataclass(frozen=True, slots=True)
class Progress:
    step: int
    """Denoising steps done."""
    steps: int
    """Denoising steps in all (an img2img item runs only the last ones of its schedule)."""
    preview: bytes | None = None
    """A JPEG of the item now (the latest one made; None until the first)."""
    at: float = 0.0
    """When it was reported (monotonic seconds)."""
    first_at: float = 0.0
    """When its first step of this run was reported (the step rate's start)."""

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.steps) if self.steps else 0.0

    def seconds_left(self) -> float:
        """The remaining steps at the rate seen so far (0 before two steps)."""
        if self.step <= 1 or self.at <= self.first_at:
            return 0.0
        return (self.at - self.first_at) / (self.step - 1) * max(0, self.steps - self.step)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "steps": self.steps, "fraction": round(self.fraction, 4)}


@dataclass(slots=True)
class _Entry:
    progress: Progress
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class ProgressBoard:
    """Thread-safe: `put` from the engine thread, the rest from the event loop."""

    def __init__(self, *, preview_every: int = 0, clock: Clock = time.monotonic) -> None:
        self.preview_every = preview_every
        self._clock = clock
        self._lock = threading.Lock()
        self._latest: dict[str, Progress] = {}
        self._listeners: dict[str, int] = {}
        self._watched_until: dict[str, float] = {}  # pollers (A1111's /progress) want previews
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self.mirror: Callable[[str, Progress], None] | None = None
        """Called (engine thread) with each new progress of a key, when set (`--role worker`)."""

    # -- the engine's side ---------------------------------------------------------------

    def wants_preview(self, key: str, step: int) -> bool:
        """A preview is made at this step for `key`: previews are on, someone listens (or the
        progress is mirrored for a listener elsewhere) and the step is due."""
        if self.preview_every <= 0 or step % self.preview_every:
            return False
        with self._lock:
            return (self.mirror is not None or self._listeners.get(key, 0) > 0
                    or self._watched_until.get(key, 0.0) > self._clock())

    def watch(self, key: str, for_s: float) -> None:
        """A poller (no connection held open) wants `key`'s previews for the next `for_s`."""
        with self._lock:
            self._watched_until[key] = self._clock() + for_s

    def report(self, key: str, step: int, steps: int,
               preview: Callable[[], bytes | None] | None = None) -> None:
        """`put`, the preview made (by calling `preview`) only when `wants_preview` says so:
        what the engine's step callbacks call."""
        image = preview() if preview is not None and self.wants_preview(key, step) else None
        self.put(key, step, steps, image)

    def batch_stepped(self, keys: Sequence[str | None], step: int, steps: int,
                      preview: Callable[[int], bytes | None] | None) -> None:
        """A whole batch's step (the engine's `on_step`; `keys[i]` is row i's key, None for a
        row nobody follows): every keyed row, then the batch's own (row 0, for A1111)."""
        for i, key in enumerate(keys):
            if key is not None:
                self.report(key, step, steps, None if preview is None else partial(preview, i))
        self.report(BATCH, step, steps, None if preview is None else partial(preview, 0))

    def put(self, key: str, step: int, steps: int, preview: bytes | None = None) -> None:
        with self._lock:
            old = self._latest.get(key)
            now = self._clock()
            same_run = old is not None and old.step < step and old.steps == steps
            keep = preview if preview is not None else (old.preview if same_run and old else None)
            first = old.first_at if same_run and old else now
            progress = Progress(step, steps, keep, now, first)
            self._latest[key] = progress
            waiters = self._waiters.pop(key, [])
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)
        if self.mirror is not None:
            self.mirror(key, progress)

    def drop(self, key: str) -> None:
        """The request ended: its progress is no longer news."""
        with self._lock:
            self._latest.pop(key, None)
            waiters = self._waiters.pop(key, [])
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)

    # -- the listeners' side -------------------------------------------------------------

    def get(self, key: str) -> Progress | None:
        with self._lock:
            return self._latest.get(key)

    def latest(self) -> list[Progress]:
        """Every running key's progress (A1111's `/sdapi/v1/progress` shows the batch's)."""
        with self._lock:
            return list(self._latest.values())

    @contextmanager
    def listen(self, key: str) -> Iterator[None]:
        """While inside, `key`'s previews are made (when `preview_every` is on)."""
        with self._lock:
            self._listeners[key] = self._listeners.get(key, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._listeners[key] - 1
                if left:
                    self._listeners[key] = left
                else:
                    del self._listeners[key]

    async def changed(self, key: str, timeout_s: float) -> None:
        """Returns at `key`'s next `put` or `drop`, or after `timeout_s`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        with self._lock:
            self._waiters.setdefault(key, []).append((loop, waiter))
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                line = self._waiters.get(key)
                if line is not None:
                    line[:] = [(lp, w) for lp, w in line if w is not waiter]
                    if not line:
                        del self._waiters[key]


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
