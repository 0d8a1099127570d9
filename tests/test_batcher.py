"""The scheduler alone: a fake async runner held behind events and an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from batchserve.batcher import Batcher, Outcome
from batchserve.errors import (
    Draining,
    GenerationFailed,
    QueueFull,
    QueueTimeout,
)

Item = tuple[str, int]  # (key, n)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class HeldRunner:
    """Each batch waits until the test releases it; records what ran."""

    batches: list[list[Item]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    fail_with: Callable[[list[Item]], Exception | None] = lambda items: None

    async def __call__(self, items: list[Item]) -> list[str]:
        self.batches.append(items)
        self.started.set()
        await self.release.wait()
        error = self.fail_with(items)
        if error is not None:
            raise error
        return [f"img-{key}-{n}" for key, n in items]


async def _until(predicate: Callable[[], bool], rounds: int = 200) -> None:
    """Yields to the loop until `predicate` holds (no wall-clock waiting)."""
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def _pending(fut: asyncio.Future[object]) -> bool:
    done, _ = await asyncio.wait({fut}, timeout=0.01)
    return not done


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(runner: HeldRunner, clock: FakeClock, **kw: float) -> Batcher[Item, str]:
    options: dict[str, float] = {"max_batch_size": 4, "max_wait_s": 10.0, "max_queue": 64}
    options.update(kw)
    return Batcher(
        runner,
        max_batch_size=int(options["max_batch_size"]),
        max_wait_s=options["max_wait_s"],
        max_queue=int(options["max_queue"]),
        aging_s=options.get("aging_s", 5.0),
        clock=clock,
    )


class Harness:
    def __init__(self, batcher: Batcher[Item, str], runner: HeldRunner, clock: FakeClock) -> None:
        self.b, self.runner, self.clock = batcher, runner, clock
        self.task = asyncio.create_task(batcher.run())

    def submit(self, key: str, n: int, priority: int = 0, timeout_s: float = 1e6
               ) -> asyncio.Future[Outcome[str]]:
        return self.b.submit((key, n), key=key, priority=priority, timeout_s=timeout_s)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.b.poke()
        await asyncio.sleep(0)

    async def close(self) -> None:
        self.runner.release.set()
        self.b.close()
        await asyncio.wait_for(self.task, 5)


def test_flushes_when_full_without_waiting(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        h = Harness(make(runner, clock, max_batch_size=4), runner, clock)
        futs = [h.submit("a", i) for i in range(4)]
        await _until(lambda: len(runner.batches) == 1)
        assert runner.batches[0] == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]
        runner.release.set()
        results = await asyncio.gather(*futs)
        assert [r.result for r in results] == [f"img-a-{i}" for i in range(4)]
        assert {r.batch_size for r in results} == {4}
        await h.close()

    asyncio.run(scenario())


def test_partial_group_waits_for_deadline_then_flushes(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        h = Harness(make(runner, clock, max_batch_size=4, max_wait_s=0.5), runner, clock)
        futs = [h.submit("a", i) for i in range(2)]
        await h.advance(0.49)
        assert runner.batches == []
        assert await _pending(futs[0])
        await h.advance(0.01)
        await _until(lambda: len(runner.batches) == 1)
        assert len(runner.batches[0]) == 2
        runner.release.set()
        outcome = await futs[0]
        assert outcome.queue_s == pytest.approx(0.5)
        await h.close()

    asyncio.run(scenario())


def test_keys_are_never_mixed(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        runner.release.set()
        h = Harness(make(runner, clock, max_batch_size=3, max_wait_s=1.0), runner, clock)
        futs = [h.submit(k, i) for i, k in enumerate("abcabcaab")]
        await h.advance(2.0)
        await asyncio.gather(*futs)
        for batch in runner.batches:
            assert len({key for key, _ in batch}) == 1
        assert sorted(n for batch in runner.batches for _, n in batch) == list(range(9))
        await h.close()

    asyncio.run(scenario())


def test_due_groups_ordered_by_priority_then_age(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        h = Harness(make(runner, clock, max_batch_size=8, max_wait_s=1.0), runner, clock)
        blocker = h.submit("z", 0)
        await h.advance(1.0)
        await _until(lambda: len(runner.batches) == 1)  # engine busy with "z"
        old_low = h.submit("old", 1)
        await h.advance(0.1)
        new_low = h.submit("new", 2)
        await h.advance(0.1)
        high = h.submit("high", 3, priority=5)
        await h.advance(2.0)  # all three groups are due while the engine is busy
        for fut in (blocker, high, old_low, new_low):
            runner.release.set()
            await fut
            runner.release = asyncio.Event()
        order = [batch[0][0] for batch in runner.batches]
        assert order == ["z", "high", "old", "new"]
        await h.close()

    asyncio.run(scenario())


def test_due_group_keeps_growing_while_engine_busy(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        h = Harness(make(runner, clock, max_batch_size=4, max_wait_s=1.0), runner, clock)
        first = h.submit("a", 0)
        await h.advance(1.0)
        await _until(lambda: len(runner.batches) == 1)
        later = [h.submit("b", i) for i in range(6)]
        await h.advance(5.0)
        runner.release.set()
        await first
        await asyncio.gather(*later)
        assert [len(b) for b in runner.batches] == [1, 4, 2]
        await h.close()

    asyncio.run(scenario())


def test_low_priority_key_does_not_starve(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        b = make(runner, clock, max_batch_size=2, max_wait_s=0.1, aging_s=1.0)
        h = Harness(b, runner, clock)
        low = h.submit("low", 0, priority=-10)
        batches_before_low = 0
        for i in range(40):  # a steady stream of high-priority full batches
            h.submit("hot", 2 * i, priority=10)
            h.submit("hot", 2 * i + 1, priority=10)
            await h.advance(1.0)
            runner.release.set()
            await _until(lambda: not b.queue.inflight or low.done())
            for _ in range(3):
                await asyncio.sleep(0)
            runner.release = asyncio.Event()
            if low.done():
                break
            batches_before_low += 1
        runner.release.set()
        assert low.done(), "low-priority request starved"
        assert (await low).result == "img-low-0"
        assert batches_before_low <= 25  # aged +1/s from -10 past +10 within ~21 s
        await h.close()

    asyncio.run(scenario())


def test_raising_runner_fails_only_its_batch_and_loop_continues(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner(fail_with=lambda items: RuntimeError("boom")
                            if items[0][0] == "bad" else None)
        runner.release.set()
        h = Harness(make(runner, clock, max_batch_size=2), runner, clock)
        bad = [h.submit("bad", i) for i in range(2)]
        good = [h.submit("good", i) for i in range(2)]
        results = await asyncio.gather(*bad, *good, return_exceptions=True)
        assert all(isinstance(r, GenerationFailed) for r in results[:2])
        assert "RuntimeError" in str(results[0]) and "boom" not in str(results[0])
        assert [r.result for r in results[2:]] == ["img-good-0", "img-good-1"]  # type: ignore[union-attr]
        again = h.submit("good", 9)
        await h.advance(20)
        assert (await again).result == "img-good-9"
        await h.close()

    asyncio.run(scenario())


def test_expired_items_get_timeout_and_are_never_run(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        h = Harness(make(runner, clock, max_batch_size=4, max_wait_s=10.0), runner, clock)
        short = h.submit("a", 0, timeout_s=1.0)
        await h.advance(1.0)
        with pytest.raises(QueueTimeout):
            await short
        assert runner.batches == [] and h.b.depth == 0
        await h.close()

    asyncio.run(scenario())


def test_cancelled_item_is_dropped_before_its_batch(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        runner.release.set()
        h = Harness(make(runner, clock, max_batch_size=4, max_wait_s=1.0), runner, clock)
        keep, gone = h.submit("a", 0), h.submit("a", 1)
        gone.cancel()
        await h.advance(1.0)
        assert (await keep).batch_size == 1
        assert runner.batches == [[("a", 0)]]
        await h.close()

    asyncio.run(scenario())


def test_queue_bound_rejects_with_retry_after_from_measured_batch_times(
    clock: FakeClock,
) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        h = Harness(make(runner, clock, max_queue=3, max_batch_size=2, max_wait_s=0),
                    runner, clock)
        first = h.submit("a", 0)
        await _until(lambda: len(runner.batches) == 1)
        clock.now += 3.0  # that batch takes 3 s
        runner.release.set()
        await first
        runner.release.clear()
        h.submit("a", 1)  # occupies the engine
        await _until(lambda: len(runner.batches) == 2)
        for i in range(3):
            h.submit("b", i)
        with pytest.raises(QueueFull) as caught:
            h.submit("b", 3)
        # 3 queued at 2 per batch = 2 batches ahead, at the measured 3 s each
        assert caught.value.retry_after_s == 6
        await h.close()

    asyncio.run(scenario())


def test_drain_runs_everything_queued_then_refuses(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        runner.release.set()
        b = make(runner, clock, max_batch_size=4, max_wait_s=1e6)
        h = Harness(b, runner, clock)
        futs = [h.submit(k, i) for i, k in enumerate("aab")]
        assert await b.drain(timeout_s=5)
        assert all(f.done() and not f.exception() for f in futs)
        with pytest.raises(Draining):
            h.submit("a", 9)
        await asyncio.wait_for(h.task, 1)

    asyncio.run(scenario())


def test_drain_timeout_fails_leftovers_with_draining(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()  # never released: the batch hangs
        b = make(runner, clock, max_batch_size=1, max_wait_s=0)
        h = Harness(b, runner, clock)
        inflight, queued = h.submit("a", 0), h.submit("a", 1)
        await _until(lambda: len(runner.batches) == 1)
        assert not await b.drain(timeout_s=0.01)
        for fut in (inflight, queued):
            with pytest.raises(Draining):
                await fut
        runner.release.set()
        await asyncio.wait_for(h.task, 1)

    asyncio.run(scenario())
