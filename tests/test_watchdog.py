"""The watchdog: a batch that runs far past its predicted time fails its requests, turns the
server unhealthy and ends the process. An engine held behind an Event and an injected clock:
no test waits for real time to pass."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import uvicorn
from inprocess import in_process

from batchserve.errors import EngineHung
from batchserve.sched.watchdog import Watchdog
from batchserve.server import Server

from fakes import FakeEngine

BODY = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "inference_steps": 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(predicate: Any, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never became true")


def test_bound_is_a_multiple_of_the_measured_rate_with_a_floor() -> None:
    dog = Watchdog(factor=10, min_s=5)
    assert dog.bound_s(1_000_000) == 5  # nothing measured yet: the floor
    dog.measured(work=1_000_000, seconds=2.0)  # 2 s per megapixel-step
    assert dog.bound_s(1_000_000) == 20
    assert dog.bound_s(100) == 5
    dog.measured(work=1_000_000, seconds=1.0)  # smoothed, not replaced
    assert dog.bound_s(1_000_000) == pytest.approx(10 * (0.8 * 2 + 0.2 * 1))


def test_guard_passes_results_through_and_measures_them() -> None:
    async def scenario() -> None:
        clock = Clock()
        dog = Watchdog(factor=10, min_s=1, clock=clock)

        async def call() -> str:
            clock.now += 3
            return "images"

        assert await dog.guard(call(), work=300) == "images"
        assert dog.rate_s == pytest.approx(0.01)
        # a call that may stop early is bounded by the most it may do, measured by what it did
        dog = Watchdog(factor=10, min_s=1, clock=clock)
        assert await dog.guard(call(), work=3000, done_work=lambda result: 300) == "images"
        assert dog.rate_s == pytest.approx(0.01)

    asyncio.run(scenario())


def test_guard_gives_up_past_its_bound_and_abandons_the_call() -> None:
    async def scenario() -> None:
        clock = Clock()
        dog = Watchdog(factor=10, min_s=60, clock=clock)
        never = asyncio.get_running_loop().create_future()
        guarded = asyncio.ensure_future(dog.guard(never, work=1))
        await asyncio.sleep(0)
        clock.now += 59.9
        dog.poke()
        await asyncio.sleep(0)
        assert not guarded.done()
        clock.now += 0.2
        dog.poke()
        with pytest.raises(EngineHung):
            await asyncio.wait_for(guarded, 1)
        assert never.cancelled()

    asyncio.run(scenario())


def test_factor_zero_turns_it_off() -> None:
    async def scenario() -> None:
        clock = Clock()
        dog = Watchdog(factor=0, min_s=1, clock=clock)
        release = asyncio.get_running_loop().create_future()
        guarded = asyncio.ensure_future(dog.guard(release, work=1))
        clock.now += 1e6
        dog.poke()
        await asyncio.sleep(0)
        assert not guarded.done()
        release.set_result("late but fine")
        assert await guarded == "late but fine"

    asyncio.run(scenario())


async def test_hung_batch_fails_its_requests_turns_unhealthy_and_ends_the_process() -> None:
    gate = threading.Event()  # never opened by the test: the engine call hangs
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, watchdog_factor=10,
                          watchdog_min_s=60) as app:
        clock = Clock()
        app.service.watchdog.clock = clock
        server = Server(uvicorn.Config(app.app, log_config=None), app.service)
        hung = asyncio.create_task(app.client.post("/t2i", json={**BODY, "seed": 1}))
        await until(lambda: engine.started.is_set())
        queued = asyncio.create_task(app.client.post("/t2i", json={**BODY, "seed": 2}))
        await until(lambda: app.service.batcher.depth == 1)
        clock.now += 59
        app.service.watchdog.poke()
        await asyncio.sleep(0.01)
        assert not hung.done() and (await app.client.get("/healthz")).status_code == 200
        clock.now += 2
        app.service.watchdog.poke()
        responses = await asyncio.wait_for(asyncio.gather(hung, queued), 5)
        for response in responses:
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "engine_hung" and "within 60 s" in error["message"]
            assert response.headers["retry-after"] == "5"
        assert (await app.client.get("/healthz")).status_code == 503
        assert (await app.client.get("/readyz")).status_code == 503
        assert server.should_exit and server.exit_code == 1
        assert app.metric("batchserve_requests_rejected_total", reason="failed") == 2
        assert [len(b) for b in engine.batches] == [1]  # the queued one never ran
