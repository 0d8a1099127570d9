"""Holds refused requests for a while instead of answering them at once.

A client that retries at once on `429`/`503` (load tools, naive scripts, a crashed client's
restart loop) turns every instant refusal into another request: at about a thousand a second the
event loop and the logger take the CPU from the engine. Holding the refusal until a place is
likely free (or `hold_s` passed) turns such a client into a polite one: it waits, as it would in
the queue, and costs nothing while it waits.

FIFO: only the first held request tries again when woken (by `opened`, or every `poll_s`, for
refusals that time rather than a freed place lifts); when it gets in, it wakes the next one at
once, so several places freed together are all filled. Nothing here knows HTTP or the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")
Clock = Callable[[], float]


class RoomHooks(Protocol):
    def held(self, n: int) -> None: ...
    def left_room(self, outcome: str) -> None: ...


class _NoHooks:
    def held(self, n: int) -> None:
        pass

    def left_room(self, outcome: str) -> None:
        pass


class WaitingRoom:
    """`admit(attempt, refusals)` calls `attempt()`; while it raises one of `refusals`, holds
    the caller (FIFO) up to `hold_s`, retrying when woken, then re-raises the last refusal.

    Guarantees: at most `max_held` callers are held (beyond: the refusal at once); a held caller
    is answered by `hold_s` after it arrived (plus one `poll_s`); `hold_s == 0` is the plain
    instant refusal."""

    def __init__(self, *, hold_s: float, max_held: int, poll_s: float = 0.25,
                 clock: Clock = time.monotonic, hooks: RoomHooks | None = None) -> None:
        self.hold_s, self.max_held, self.poll_s = hold_s, max_held, poll_s
        self._clock = clock
        self._hooks = hooks or _NoHooks()
        self._line: deque[asyncio.Future[None]] = deque()

    @property
    def held(self) -> int:
        return len(self._line)

    def opened(self) -> None:
        """A place may have freed (a batch started or ended): the first held caller retries."""
        if self._line and not self._line[0].done():
            self._line[0].set_result(None)

    async def admit(self, attempt: Callable[[], T],
                    refusals: tuple[type[BaseException], ...]) -> T:
        try:
            return attempt()
        except refusals:
            if self.hold_s <= 0 or len(self._line) >= self.max_held:
                self._hooks.left_room("refused")
                raise
        deadline = self._clock() + self.hold_s
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        self._hooks.held(len(self._line))
        try:
            while True:
                await self._wait(turn, deadline)
                turn = self._renew(turn)
                try:
                    result = attempt()
                except refusals:
                    if self._clock() >= deadline:
                        self._hooks.left_room("refused")
                        raise
                    continue
                self._hooks.left_room("admitted")
                return result
        finally:
            with contextlib.suppress(ValueError):
                self._line.remove(turn)
            self._hooks.held(len(self._line))
            self.opened()  # the next in line tries now: a freed place is not left unused

    async def _wait(self, turn: asyncio.Future[None], deadline: float) -> None:
        """Until woken at the head of the line, `poll_s` passed while at the head, or the
        deadline (then the caller tries one last time)."""
        left = deadline - self._clock()
        if left <= 0:
            return
        first = self._line and self._line[0] is turn
        timeout = min(left, self.poll_s) if first else left
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(turn), timeout)

    def _renew(self, turn: asyncio.Future[None]) -> asyncio.Future[None]:
        """A fresh future in the same place in line, for the next wait."""
        if not turn.done():
            return turn
        fresh: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        index = self._line.index(turn)
        self._line[index] = fresh
        return fresh
