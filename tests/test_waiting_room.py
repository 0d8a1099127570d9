"""The waiting room holds refused requests (FIFO) until a place frees or the hold passes; the
refusal log writes a bounded number of lines. Clocks are injected: nothing sleeps."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchserve.api.common import RefusalLog
from batchserve.errors import QueueFull
from batchserve.sched.waiting_room import WaitingRoom


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Places:
    """A queue with `free` places: each admitted call takes one."""

    def __init__(self) -> None:
        self.free, self.calls = 0, 0

    def attempt(self, name: str) -> str:
        self.calls += 1
        if self.free <= 0:
            raise QueueFull("full", retry_after_s=1)
        self.free -= 1
        return name


class Hooks:
    def __init__(self) -> None:
        self.ended: list[str] = []
        self.most = 0

    def held(self, n: int) -> None:
        self.most = max(self.most, n)

    def left_room(self, outcome: str) -> None:
        self.ended.append(outcome)


async def still_pending(*tasks: asyncio.Task[Any]) -> bool:
    done, _ = await asyncio.wait(tasks, timeout=0.01)
    return not done


async def test_a_refused_request_is_held_and_admitted_in_order_when_places_free() -> None:
    clock, places, hooks = Clock(), Places(), Hooks()
    room = WaitingRoom(hold_s=10, max_held=8, poll_s=60, clock=clock, hooks=hooks)
    a = asyncio.create_task(room.admit(lambda: places.attempt("a"), (QueueFull,)))
    b = asyncio.create_task(room.admit(lambda: places.attempt("b"), (QueueFull,)))
    assert await still_pending(a, b) and room.held == 2
    calls = places.calls
    assert await still_pending(a, b) and places.calls == calls  # no spinning while held
    places.free = 2
    room.opened()  # one wake-up fills both places: the first in line wakes the next
    assert await a == "a" and await b == "b"
    assert room.held == 0 and hooks.ended == ["admitted", "admitted"]


async def test_only_the_first_in_line_retries_on_a_wake_up() -> None:
    clock, places = Clock(), Places()
    room = WaitingRoom(hold_s=10, max_held=8, poll_s=60, clock=clock)
    tasks = [asyncio.create_task(room.admit(lambda: places.attempt("x"), (QueueFull,)))
             for _ in range(5)]
    assert await still_pending(*tasks)
    calls = places.calls
    room.opened()
    assert await still_pending(*tasks)
    assert places.calls == calls + 1  # one retry, not five
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert room.held == 0


async def test_the_hold_ends_with_the_refusal_once_hold_s_passed() -> None:
    clock, places, hooks = Clock(), Places(), Hooks()
    room = WaitingRoom(hold_s=10, max_held=8, poll_s=60, clock=clock, hooks=hooks)
    held = asyncio.create_task(room.admit(lambda: places.attempt("a"), (QueueFull,)))
    assert await still_pending(held)
    clock.now = 10.0
    room.opened()
    with pytest.raises(QueueFull):
        await held
    assert hooks.ended == ["refused"] and room.held == 0


async def test_beyond_max_held_and_with_hold_0_the_refusal_is_at_once() -> None:
    places = Places()
    room = WaitingRoom(hold_s=10, max_held=1, poll_s=60, clock=Clock())
    first = asyncio.create_task(room.admit(lambda: places.attempt("a"), (QueueFull,)))
    assert await still_pending(first)
    with pytest.raises(QueueFull):
        await room.admit(lambda: places.attempt("b"), (QueueFull,))
    first.cancel()
    with pytest.raises(QueueFull):
        await WaitingRoom(hold_s=0, max_held=8).admit(lambda: places.attempt("c"), (QueueFull,))


async def test_other_errors_are_not_held() -> None:
    room = WaitingRoom(hold_s=10, max_held=8, clock=Clock())

    def bad() -> str:
        raise ValueError("invalid")

    with pytest.raises(ValueError):
        await room.admit(bad, (QueueFull,))
    assert room.held == 0


def test_refusal_log_writes_per_s_lines_and_counts_the_rest() -> None:
    clock = Clock()
    sampled = RefusalLog(5, clock=clock)
    written = [sampled.take({}) for _ in range(1000)]  # a thousand refusals in one instant
    assert written.count(True) == 5
    clock.now = 1.0
    record: dict[str, Any] = {}
    assert sampled.take(record) and record["suppressed"] == 995
