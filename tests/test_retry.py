"""`run_split` alone: out-of-memory halving, poison bisection, per-part delivery, and the
learned per-shape limit (`BatchSizes`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from batchserve.errors import BatchServeError, EngineOutOfMemory, GenerationFailed, Interrupted
from batchserve.sched.batchsize import BatchSizes
from batchserve.sched.retry import Part, run_split


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Sizes:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def fitted(self, size: int) -> None:
        self.events.append(("fit", size))

    def out_of_memory(self, size: int) -> None:
        self.events.append(("oom", size))


def runner_that(fail: Callable[[list[int]], Exception | None], calls: list[list[int]],
                clock: Clock | None = None) -> Callable[[list[int]], object]:
    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if clock is not None:
            clock.now += len(items)  # a batch of n takes n seconds
        error = fail(items)
        if error is not None:
            raise error
        return [i * 10 for i in items]

    return run


def split(runner: Callable[[list[int]], object], n: int, **kw: object) -> list[Part[int]]:
    parts: list[Part[int]] = []
    clock = kw.pop("clock", Clock())
    asyncio.run(run_split(runner, list(range(n)), parts.append, clock=clock, **kw))  # type: ignore[arg-type]
    return parts


def test_out_of_memory_halves_down_to_single_items_and_reports_sizes() -> None:
    calls: list[list[int]] = []
    sizes = Sizes()
    oom = runner_that(lambda items: EngineOutOfMemory("oom") if len(items) > 2 or 7 in items
                      else None, calls)
    parts = split(oom, 8, sizes=sizes)
    assert [len(c) for c in calls] == [8, 4, 2, 2, 4, 2, 2, 1, 1]
    assert [p.indices for p in parts] == [(0, 1), (2, 3), (4, 5), (6,), (7,)]
    assert [list(p.results or []) for p in parts[:4]] == [[0, 10], [20, 30], [40, 50], [60]]
    assert isinstance(parts[4].error, EngineOutOfMemory) and parts[4].results is None
    assert sizes.events == [("oom", 8), ("oom", 4), ("fit", 2), ("fit", 2), ("oom", 4),
                            ("fit", 2), ("oom", 2), ("fit", 1), ("oom", 1)]


def test_each_part_is_delivered_when_it_ends_with_its_own_start_and_duration() -> None:
    clock, calls = Clock(), []
    order: list[str] = []
    parts: list[Part[int]] = []
    oom = runner_that(lambda items: EngineOutOfMemory("oom") if len(items) > 2 else None,
                      calls, clock)

    async def traced(items: list[int]) -> object:
        order.append(f"run {items}")
        return await oom(items)  # type: ignore[misc]

    def deliver(part: Part[int]) -> None:
        order.append(f"deliver {list(part.indices)}")
        parts.append(part)

    asyncio.run(run_split(traced, [0, 1, 2, 3], deliver, clock=clock))
    assert order == ["run [0, 1, 2, 3]", "run [0, 1]", "deliver [0, 1]", "run [2, 3]",
                     "deliver [2, 3]"]
    assert [(p.started, p.seconds) for p in parts] == [(4.0, 2.0), (6.0, 2.0)]


def test_a_poisonous_item_is_isolated_by_bisection() -> None:
    calls: list[list[int]] = []
    poison = runner_that(lambda items: RuntimeError("bad item") if 5 in items else None, calls)
    parts = split(poison, 8)
    failed = [p for p in parts if p.error is not None]
    assert [p.indices for p in failed] == [(5,)] and isinstance(failed[0].error, RuntimeError)
    assert sorted(i for p in parts if p.error is None for i in p.indices) == [0, 1, 2, 3, 4, 6, 7]
    assert len(calls) == 7  # 8, then 4 + 4, 2 + 2, 1 + 1: log2 rounds, not one call per item


def test_domain_errors_are_final_for_the_whole_part() -> None:
    calls: list[list[int]] = []
    parts = split(runner_that(lambda items: GenerationFailed("engine hung"), calls), 4)
    assert len(calls) == 1 and [p.indices for p in parts] == [(0, 1, 2, 3)]
    assert isinstance(parts[0].error, BatchServeError)


def test_wrong_result_count_is_an_error_and_is_bisected() -> None:
    calls: list[list[int]] = []

    async def short(items: list[int]) -> list[int]:
        calls.append(items)
        return [1] if len(items) > 1 else [i * 10 for i in items]

    parts = split(short, 2)
    assert [list(p.results or []) for p in parts] == [[0], [10]]


def test_items_whose_clients_left_are_not_retried() -> None:
    calls: list[list[int]] = []
    gone = {2, 3}
    oom = runner_that(lambda items: EngineOutOfMemory("oom") if len(items) > 2 else None, calls)
    parts = split(oom, 4, wanted=lambda i: i not in gone or len(calls) == 0)
    assert calls == [[0, 1, 2, 3], [0, 1]]  # the half of clients who left never ran
    assert [p.indices for p in parts] == [(0, 1)]


# -- the learned limit ---------------------------------------------------------------------


def test_limit_drops_to_what_fitted_and_grows_back_slowly() -> None:
    changes: list[tuple[object, int]] = []
    sizes = BatchSizes(8, grow_after=3, on_change=lambda key, n: changes.append((key, n)))
    assert sizes.limit("k") == 8 and sizes.learned() == {}
    sizes.out_of_memory("k", 8)
    assert sizes.limit("k") == 4 and sizes.limit("other") == 8  # per key
    sizes.fitted("k", 4)
    sizes.fitted("k", 4)
    assert sizes.limit("k") == 4
    sizes.fitted("k", 4)
    assert sizes.limit("k") == 5  # 3 batches at the limit fitted: try one more
    sizes.out_of_memory("k", 5)
    assert sizes.limit("k") == 4  # 4 is known to fit: no halving
    for _ in range(5):
        sizes.fitted("k", 4)
    assert sizes.limit("k") == 4  # a failed probe doubles the wait (3 -> 6)
    sizes.fitted("k", 4)
    assert sizes.limit("k") == 5
    assert changes == [("k", 4), ("k", 5), ("k", 4), ("k", 5)]
    assert sizes.learned() == {"k": 5}


@pytest.mark.parametrize(("size", "limit"), [(8, 4), (7, 4), (2, 1), (1, 1)])
def test_first_out_of_memory_tries_the_larger_half(size: int, limit: int) -> None:
    sizes = BatchSizes(8)
    sizes.out_of_memory("k", size)
    assert sizes.limit("k") == limit


def test_smaller_batches_do_not_count_towards_growing() -> None:
    sizes = BatchSizes(8, grow_after=1)
    sizes.out_of_memory("k", 8)
    sizes.fitted("k", 2)  # a small group: says nothing about 5
    assert sizes.limit("k") == 4


def test_interrupted_part_is_final_and_later_parts_nobody_wants_never_start() -> None:
    """`Interrupted` means nobody waits for the part: it is delivered as is, never bisected; a
    later part whose items are all unwanted by then is skipped."""
    calls: list[list[int]] = []
    gone: set[int] = set()

    def fail(items: list[int]) -> Exception | None:
        if len(items) > 2:
            return EngineOutOfMemory("oom")
        if items == [0, 1]:
            gone.update({0, 1, 2, 3})  # every client left while the first half ran
            return Interrupted("stopped after step 1")
        return None

    started: list[tuple[int, ...]] = []
    parts = split(runner_that(fail, calls), 4, wanted=lambda i: i not in gone,
                  starting=started.append)
    assert calls == [[0, 1, 2, 3], [0, 1]]
    assert started == [(0, 1, 2, 3), (0, 1)]
    assert [(p.indices, type(p.error)) for p in parts] == [((0, 1), Interrupted)]

    def interrupt_first_half(items: list[int]) -> Exception | None:
        if len(items) > 2:
            return EngineOutOfMemory("oom")
        return Interrupted("stopped after step 1") if items == [0, 1] else None

    calls.clear()
    parts = split(runner_that(interrupt_first_half, calls), 4)
    # not bisected into [0], [1] even though (here) the items still count as wanted
    assert calls == [[0, 1, 2, 3], [0, 1], [2, 3]]
    assert [(p.indices, type(p.error)) for p in parts] == [((0, 1), Interrupted),
                                                             ((2, 3), type(None))]
