"""The `continuous` loop alone: a fake step runner held step by step, an injected clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from batchserve.errors import (
    Draining,
    EngineOutOfMemory,
    GenerationFailed,
    QueueFull,
    QueueTimeout,
)
from batchserve.sched.request_queue import NullHooks, Outcome
from batchserve.stepper import Advanced, StepBatcher, _Suspended

Item = tuple[str, str, int]  # (shape, name, steps)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass(eq=False)
class State:
    name: str
    remaining: int


@dataclass
class HeldSteps:
    """Each step waits for a token from `allow`; records the names in every step."""

    steps: list[list[str]] = field(default_factory=list)
    prepared: list[str] = field(default_factory=list)
    tokens: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))
    oom_above: int | None = None

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self.tokens.release()

    async def prepare(self, payloads: list[Item]) -> list[Any]:
        self.prepared += [name for _, name, _ in payloads]
        return [State(name, steps) for _, name, steps in payloads]

    async def step(self, states: list[Any]) -> None:
        self.steps.append([s.name for s in states])
        await self.tokens.acquire()
        if self.oom_above is not None and len(states) > self.oom_above:
            raise EngineOutOfMemory("fake oom")
        for state in states:
            state.remaining -= 1

    async def finish(self, pairs: list[tuple[Item, Any]]) -> list[str]:
        return [f"img-{state.name}" for _, state in pairs]

    def done(self, state: Any) -> bool:
        return bool(state.remaining <= 0)

    def remaining(self, state: Any) -> int:
        return int(state.remaining)


@dataclass
class Recorder(NullHooks):
    rejected_reasons: list[str] = field(default_factory=list)
    step_sizes: list[int] = field(default_factory=list)
    active: list[int] = field(default_factory=list)

    def rejected(self, reason: str) -> None:
        self.rejected_reasons.append(reason)

    def step(self, size: int) -> None:
        self.step_sizes.append(size)

    def active_items(self, count: int) -> None:
        self.active.append(count)


async def _until(predicate: Callable[[], bool], rounds: int = 500) -> None:
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def _pending(fut: asyncio.Future[Any]) -> bool:
    done, _ = await asyncio.wait({fut}, timeout=0.01)
    return not done


class Harness:
    def __init__(self, clock: FakeClock, runner: HeldSteps | None = None, **kw: Any) -> None:
        self.runner = runner or HeldSteps()
        self.hooks = Recorder()
        options: dict[str, Any] = {"max_batch_size": 4, "max_wait_s": 10.0, "max_queue": 64,
                                   "clock": clock, "hooks": self.hooks, **kw}
        self.b: StepBatcher[Item, str] = StepBatcher(self.runner, **options)
        self.clock = clock
        self.task = asyncio.create_task(self.b.run())

    def submit(self, name: str, steps: int, shape: str = "s", priority: int = 0,
               timeout_s: float = 1e6) -> asyncio.Future[Outcome[str]]:
        return self.b.submit((shape, name, steps), key=shape, priority=priority,
                             timeout_s=timeout_s)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.b.poke()
        await asyncio.sleep(0)

    async def close(self) -> None:
        self.runner.allow(1000)
        self.b.close()
        await asyncio.wait_for(self.task, 5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def names(futs: Sequence[asyncio.Future[Outcome[str]]]) -> list[str]:
    return [f.result().result for f in futs]


async def test_lone_request_starts_at_once_without_waiting(clock: FakeClock) -> None:
    h = Harness(clock, max_wait_s=100.0)
    fut = h.submit("a", 2)
    await _until(lambda: h.runner.steps == [["a"]])  # no clock advance needed
    h.runner.allow(2)
    outcome = await fut
    assert (outcome.result, outcome.batch_size) == ("img-a", 1)
    await h.close()


async def test_item_joining_mid_flight_finishes_before_longer_earlier_item(
    clock: FakeClock,
) -> None:
    h = Harness(clock)
    long = h.submit("long", 5)
    await _until(lambda: len(h.runner.steps) == 1)
    clock.now += 0.5
    short = h.submit("short", 2)
    h.runner.allow(1)  # long's first step ends; short joins before the second
    await _until(lambda: len(h.runner.steps) == 2)
    assert h.runner.steps[1] == ["long", "short"]
    h.runner.allow(2)
    done = await asyncio.wait_for(short, 5)
    assert await _pending(long)  # long still has steps to go
    assert done.batch_size == 2  # both of its steps shared with long
    h.runner.allow(2)
    assert (await long).result == "img-long"
    assert h.runner.steps == [["long"], ["long", "short"], ["long", "short"], ["long"], ["long"]]
    assert (await long).batch_size == 1  # mean 7/5 shared
    assert h.hooks.step_sizes == [1, 2, 2, 1, 1]
    await h.close()


async def test_cancelled_item_frees_its_slot_for_the_next_queued(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=2)
    a, b, c = h.submit("a", 4), h.submit("b", 4), h.submit("c", 4)
    await _until(lambda: h.runner.steps == [["a", "b"]])
    b.cancel()
    h.runner.allow(1)
    await _until(lambda: len(h.runner.steps) == 2)
    assert h.runner.steps[1] == ["a", "c"]
    assert "cancelled" in h.hooks.rejected_reasons
    h.runner.allow(10)
    await asyncio.gather(a, c)
    assert names([a, c]) == ["img-a", "img-c"]
    await h.close()


async def test_joiners_go_by_priority_then_arrival(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=2)
    first = h.submit("first", 3)
    await _until(lambda: len(h.runner.steps) == 1)
    low, high = h.submit("low", 1), h.submit("high", 1, priority=5)
    h.runner.allow(1)
    await _until(lambda: len(h.runner.steps) == 2)
    assert h.runner.steps[1] == ["first", "high"]
    h.runner.allow(10)
    await asyncio.gather(first, low, high)
    await h.close()


async def test_other_shape_runs_once_current_items_finish_after_its_wait(
    clock: FakeClock,
) -> None:
    h = Harness(clock, max_batch_size=4, max_wait_s=1.0)
    x1 = h.submit("x1", 3, shape="x")
    await _until(lambda: len(h.runner.steps) == 1)
    y = h.submit("y", 1, shape="y")
    h.runner.allow(1)
    x2 = h.submit("x2", 3, shape="x")  # y waited < 1 s: x still admits
    await _until(lambda: len(h.runner.steps) == 2)
    assert h.runner.steps[1] == ["x1", "x2"]
    await h.advance(1.0)  # y's wait is up: x stops admitting
    x3 = h.submit("x3", 3, shape="x")
    h.runner.allow(1)
    await _until(lambda: len(h.runner.steps) == 3)
    assert h.runner.steps[2] == ["x1", "x2"]
    h.runner.allow(2)  # x1 done after 3 steps, x2 after 4: then y, then x3
    await _until(lambda: len(h.runner.steps) == 5)
    assert h.runner.steps[3:5] == [["x2"], ["y"]]
    h.runner.allow(10)
    await asyncio.gather(x1, x2, y, x3)
    assert h.runner.steps[5:] == [["x3"]] * 3
    await h.close()


async def test_queued_item_times_out_while_steps_run(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=1)
    running = h.submit("run", 3)
    await _until(lambda: len(h.runner.steps) == 1)
    waiting = h.submit("late", 1, timeout_s=1.0)
    await h.advance(1.0)
    h.runner.allow(1)
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(waiting, 5)
    h.runner.allow(10)
    assert (await running).result == "img-run"
    assert "late" not in h.runner.prepared
    await h.close()


async def test_running_item_past_its_timeout_leaves_at_the_next_step(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=2)
    short_budget = h.submit("short", 10, timeout_s=1.0)
    other = h.submit("other", 3)
    await _until(lambda: len(h.runner.steps) == 1)
    clock.now += 1.0
    h.runner.allow(1)
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(short_budget, 5)
    await _until(lambda: len(h.runner.steps) == 2)
    assert h.runner.steps[1] == ["other"]
    h.runner.allow(10)
    assert (await other).result == "img-other"
    assert "timeout" in h.hooks.rejected_reasons
    await h.close()


@pytest.mark.parametrize("drop_late", [True, False])
async def test_item_that_cannot_finish_in_time_leaves_at_once(clock: FakeClock,
                                                             drop_late: bool) -> None:
    """With `drop_late`, an item whose steps left take longer than its time left, even at the
    fastest step seen, is answered 504 at the next step boundary, not at its timeout."""
    h = Harness(clock, max_batch_size=2, drop_late=drop_late)
    first = h.submit("a", 8)
    await _until(lambda: len(h.runner.steps) == 1)
    h.runner.allow(1)  # a joined in this step: prompt encoding in it, so it is not timed
    await _until(lambda: len(h.runner.steps) == 2)
    clock.now += 1.0  # a plain step of 1 s: the fastest seen
    h.runner.allow(1)
    await _until(lambda: len(h.runner.steps) == 3)
    hopeless = h.submit("b", 5, timeout_s=3.5)  # after its first step: 4 left, >= 4 s
    h.runner.allow(2)
    await _until(lambda: len(h.runner.steps) == 5)
    if drop_late:
        with pytest.raises(QueueTimeout, match="cannot finish within its timeout_s"):
            await asyncio.wait_for(hopeless, 5)
        assert h.runner.steps[3:] == [["a", "b"], ["a"]]
        assert h.hooks.rejected_reasons == ["timeout"]
    else:
        assert h.runner.steps[3:] == [["a", "b"], ["a", "b"]]
        assert await _pending(hopeless)
    feasible = h.submit("c", 2, timeout_s=3.5)  # 1 s a step: in time
    h.runner.allow(20)
    assert (await first).result == "img-a" and (await feasible).result == "img-c"
    await h.close()


async def test_queue_bound_gives_queue_full(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=1, max_queue=2)
    h.submit("a", 5)
    await _until(lambda: len(h.runner.steps) == 1)  # in flight: not counted
    h.submit("b", 1)
    h.submit("c", 1)
    with pytest.raises(QueueFull) as caught:
        h.submit("d", 1)
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 1
    await h.close()


async def test_drain_finishes_running_and_queued_of_every_shape(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=2, max_wait_s=1e6)
    futs = [h.submit("a", 2), h.submit("b", 2, shape="t"), h.submit("c", 1)]
    await _until(lambda: len(h.runner.steps) == 1)
    h.runner.allow(100)
    assert await h.b.drain(timeout_s=5)
    assert sorted(names(futs)) == ["img-a", "img-b", "img-c"]
    with pytest.raises(Draining):
        h.submit("d", 1)
    await asyncio.wait_for(h.task, 1)


async def test_drain_timeout_fails_the_active_items_with_draining(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=1)
    running, queued = h.submit("a", 2), h.submit("b", 2)
    await _until(lambda: len(h.runner.steps) == 1)  # never allowed: the step hangs
    assert not await h.b.drain(timeout_s=0.01)
    for fut in (running, queued):
        with pytest.raises(Draining):
            await fut
    h.runner.allow(10)
    await asyncio.wait_for(h.task, 1)


async def test_oom_requeues_last_joiners_lowers_the_limit_and_they_restart(
    clock: FakeClock,
) -> None:
    h = Harness(clock, max_batch_size=4)
    h.runner.oom_above = 2
    futs = [h.submit(n, 2) for n in "abcd"]
    await _until(lambda: len(h.runner.steps) == 1)
    h.runner.allow(100)
    await asyncio.gather(*futs)
    assert names(futs) == ["img-a", "img-b", "img-c", "img-d"]
    assert h.runner.steps[0] == ["a", "b", "c", "d"]  # out of memory
    assert h.runner.steps[1:3] == [["a", "b"], ["a", "b"]]  # c, d back in the queue
    assert h.runner.steps[3:] == [["c", "d"], ["c", "d"]]  # limit stays 2
    assert h.runner.prepared == ["a", "b", "c", "d", "c", "d"]  # c, d restarted from scratch
    assert h.b.limit("s") == 2  # learned (`BatchSizes`), grows back as steps at 2 fit
    await h.close()


async def test_oom_alone_fails_only_that_item(clock: FakeClock) -> None:
    h = Harness(clock, max_batch_size=4)
    h.runner.oom_above = 0
    fut = h.submit("a", 2)
    h.runner.allow(1)
    with pytest.raises(GenerationFailed, match="out of device memory"):
        await asyncio.wait_for(fut, 5)
    h.runner.oom_above = None
    again = h.submit("b", 1)
    h.runner.allow(1)
    assert (await asyncio.wait_for(again, 5)).result == "img-b"
    await h.close()


def test_sim_step_model_sleeps_per_step_and_per_static_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchserve.engines import GenerationItem, sim

    slept: list[float] = []
    monkeypatch.setattr(sim, "_sleep_ms", lambda ms, should_stop=None: slept.append(ms))
    engine = sim.SimEngine(base_ms=100, per_image_ms=10, step_ms=25, step_per_image_ms=15)
    items = [GenerationItem("p", "", s, 64, 64, 20, 7.5) for s in range(3)]
    engine.generate(items)
    # a static batch of 20 steps, slept one step at a time (so it can be interrupted)
    assert len(slept) == 20
    assert sum(slept) == pytest.approx(100 + 3 * 10 + 20 * (25 + 3 * 15))
    states = engine.prepare(items[:2])
    for _ in range(20):
        engine.step(states)
    assert slept[20:] == [25 + 2 * 15] * 20 and all(s.done for s in states)
    assert len(engine.finish(states)) == 2


@dataclass
class HeldRuns(HeldSteps):
    """An `AdvancingRunner`: one `advance` call runs steps back to back while no state is done
    and `until()` is false, each step held by a token; `calls` counts the hops from the loop."""

    calls: int = 0
    holds: list[int] = field(default_factory=list)
    decoded: list[list[str]] = field(default_factory=list)
    aheads: list[list[str]] = field(default_factory=list)

    async def advance(self, joining: list[Item], active: list[tuple[Item, Any]],
                      until: Callable[[], bool] | None = None,
                      finishing: list[tuple[Item, Any]] | None = None, hold: int = 0,
                      ahead: list[Item] | None = None) -> Advanced[str]:
        self.calls += 1
        self.holds.append(hold)
        if ahead:
            self.aheads.append([name for _, name, _ in ahead])
        out: Advanced[str] = Advanced(joined=await self.prepare(joining) if joining else [])
        pairs = [*active, *zip(joining, out.joined or [], strict=True)]
        done: list[tuple[Item, Any]] = []
        while pairs:
            await self.step([s for _, s in pairs])
            out.steps += 1
            done = [(p, s) for p, s in pairs if self.done(s)]
            if done or until is None or until():
                break
        waiting = [*(finishing or ()), *done]
        if waiting and len(waiting) >= hold:
            out.finished = await self.finish(waiting)
            self.decoded.append([s.name for _, s in waiting])
        return out


@pytest.mark.parametrize(("limit", "hops"), [(2, 1), (3, 2)])
async def test_a_submission_stops_back_to_back_steps_only_when_it_could_join(
    clock: FakeClock, limit: int, hops: int
) -> None:
    runner = HeldRuns()
    h = Harness(clock, runner=runner, max_batch_size=limit)
    first = [h.submit("a", 6), h.submit("b", 6)]
    await _until(lambda: len(runner.steps) == 1)
    late = h.submit("c", 6)
    runner.allow(3)
    await _until(lambda: len(runner.steps) == 4)
    # full (limit 2): c could not join, so the run of steps goes on in the first call;
    # with a free slot the submission ends the run after its step and c joins the next call
    assert runner.calls == hops
    assert runner.steps[3] == (["a", "b"] if limit == 2 else ["a", "b", "c"])
    runner.allow(1000)
    await asyncio.wait_for(asyncio.gather(*first, late), 5)
    assert names([*first, late]) == ["img-a", "img-b", "img-c"]
    await h.close()


async def test_at_saturation_items_done_one_by_one_are_decoded_together(clock: FakeClock
                                                                       ) -> None:
    """A full batch with more of its key queued: items that finish one at a time leave the
    batch (their slots go to the queue) and are decoded in twos (half of the limit 4);
    once nothing more waits, what is held is decoded at once."""
    runner = HeldRuns()
    h = Harness(clock, runner=runner, max_batch_size=4)
    futs = [h.submit(f"i{n}", 2 + n) for n in range(4)]  # finish at steps 2, 3, 4, 5
    more = [h.submit(f"q{n}", 8) for n in range(4)]
    await _until(lambda: len(runner.steps) == 1)
    runner.allow(2)
    await _until(lambda: len(runner.steps) == 3)
    assert runner.decoded == []  # i0 done at step 2 and held: the batch is full, q* wait
    assert "q0" in runner.steps[2] and "i0" not in runner.steps[2]  # i0's slot went to q0
    assert await _pending(futs[0])
    runner.allow(1)  # step 3: i1 done, decoded with i0
    await _until(lambda: len(runner.decoded) == 1)
    assert runner.decoded == [["i0", "i1"]]
    assert names(futs[:2]) == ["img-i0", "img-i1"]
    runner.allow(1000)  # the queue empties: the rest decode as they finish
    await asyncio.wait_for(asyncio.gather(*futs, *more), 5)
    assert names([*futs, *more]) == [f"img-i{n}" for n in range(4)] + [
        f"img-q{n}" for n in range(4)]
    assert max(runner.holds) == 2 and runner.holds[-1] == 1
    # the queued items were offered ahead once, together, for their prompts to be encoded
    assert runner.aheads == [["q0", "q1", "q2", "q3"]]
    await h.close()


async def test_the_suspension_marker_tells_a_call_that_suspended_from_one_that_did_not() -> None:
    """At saturation the loop skips its extra pass only after a runner call that suspended
    (the loop ran meanwhile); a call that answered at once (a fake) still gets the pass."""
    quick = _Suspended()

    async def answers_at_once() -> None:
        return None

    await answers_at_once()
    assert not quick
    waited = _Suspended()
    await asyncio.sleep(0)  # the engine's future resolving from its thread suspends likewise
    assert waited
