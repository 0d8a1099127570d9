"""Goodput under impatient clients: batches nobody waits for stop at the next step, requests that
cannot finish in their budget are refused at once, and the batch cap follows the clients.

Scheduler tests use an injected clock and a runner held behind events; engine-path tests use
the in-process app with a `FakeEngine` whose steps the test hands out one at a time.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from inprocess import InProcess, call_asgi, in_process
from PIL import Image
from test_batcher import FakeClock, HeldRunner, _pending, _until

from batchserve.batcher import Batcher, Outcome
from batchserve.engines import GenerationItem, StopCheck
from batchserve.errors import CannotFinish, EngineOutOfMemory, Overloaded, QueueTimeout
from batchserve.sched.adaptive import Adaptive

from conftest import running_server
from fakes import FakeEngine, Steps

KEY = (64, 64, 10, 7.5, "dpm++2m-karras")  # the default sampler joins the key
LABEL = "64x64x10x7.5/dpm++2m-karras"
BODY = {"prompt": "a slow lighthouse", "width": 64, "height": 64, "inference_steps": 10}


# -- the scheduler alone ---------------------------------------------------------------------


def adaptive_batcher(runner: HeldRunner, clock: FakeClock, *, max_batch_size: int = 8,
                     fixed_s: float | None = 1.0, per_image_s: float = 1.0,
                     max_wait_s: float = 0.0) -> Batcher[tuple[str, int], str]:
    """A batcher learning per key; key "a" already timed at `fixed_s + per_image_s * n`."""
    adaptive = Adaptive(max_batch_size=max_batch_size)
    if fixed_s is not None:
        for n in (1, 4):
            adaptive.batch_ran("a", n, fixed_s + per_image_s * n)
    return Batcher(runner, max_batch_size=max_batch_size, max_wait_s=max_wait_s, max_queue=64,
                   clock=clock, adaptive=adaptive)


class Run:
    def __init__(self, batcher: Batcher[tuple[str, int], str], runner: HeldRunner,
                 clock: FakeClock) -> None:
        self.b, self.runner, self.clock = batcher, runner, clock
        self.task = asyncio.create_task(batcher.run())

    def submit(self, n: int, timeout_s: float = 1e6, explicit: bool = True
               ) -> asyncio.Future[Outcome[str]]:
        return self.b.submit(("a", n), key="a", timeout_s=timeout_s, explicit_timeout=explicit)

    async def clients_give_up(self, n: int, after_s: float, spread_s: float = 0.0) -> None:
        """`n` clients that name no timeout each give up `after_s` (+ i * `spread_s`) after
        submitting: what learned patience learns from."""
        for i in range(n):
            fut = self.submit(i + 1, explicit=False)
            self.clock.now += after_s + spread_s * i
            fut.cancel()
            await asyncio.sleep(0)

    async def finish_batch(self) -> None:
        """Releases the running batch and re-arms the runner for the next one."""
        count = len(self.runner.batches)
        self.runner.release.set()
        await _until(lambda: self.b._running is None or len(self.runner.batches) > count)
        for _ in range(3):
            await asyncio.sleep(0)
        self.runner.release = asyncio.Event()

    async def close(self) -> None:
        self.runner.release.set()
        self.b.close()
        await asyncio.wait_for(self.task, 5)


def test_request_that_cannot_finish_in_its_budget_is_refused_at_once_and_never_queued(
    clock: FakeClock,
) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        run = Run(adaptive_batcher(runner, clock), runner, clock)  # t(n) = 1 + n seconds
        with pytest.raises(CannotFinish):  # 504: even alone it needs 2 s
            run.submit(0, timeout_s=1.5)
        assert run.b.depth == 0
        busy = [run.submit(i) for i in range(4)]
        await _until(lambda: len(runner.batches) == 1)  # a batch of 4: 5 s of work ahead
        with pytest.raises(Overloaded) as caught:  # 503: 5 s ahead + 2 s own > 4 s budget
            run.submit(9, timeout_s=4.0)
        assert caught.value.retry_after_s is not None and caught.value.retry_after_s >= 3
        assert run.b.depth == 0 and runner.batches == [[("a", i) for i in range(4)]]
        clock.now += 2.0  # 3 s of the batch left: 3 + 2 <= 5.5
        patient = run.submit(10, timeout_s=5.5)
        assert run.b.depth == 1
        await run.finish_batch()
        await run.finish_batch()
        assert (await patient).result == "img-a-10"
        await asyncio.gather(*busy)
        await run.close()

    asyncio.run(scenario())


def test_batch_is_capped_so_its_members_finish_in_budget(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        b = adaptive_batcher(runner, clock)
        run = Run(b, runner, clock)
        blocker = b.submit(("b", 0), key="b")  # another key, its time unknown
        await _until(lambda: len(runner.batches) == 1)
        # admitted: t(6) = 7 s fits their 10 s
        tight = [run.submit(i, timeout_s=10.0) for i in range(1, 7)]
        clock.now += 5.5  # but the batch ahead ran long: 4.5 s left when theirs starts
        await run.finish_batch()
        # t(3) = 4 s fits, t(4) = 5 s does not: three run, the rest wait for the next batch
        assert runner.batches[1] == [("a", 1), ("a", 2), ("a", 3)]
        await run.finish_batch()
        await run.finish_batch()
        await blocker
        assert [(await f).batch_size for f in tight] == [3] * 6
        await run.close()

    asyncio.run(scenario())


def test_group_whose_budget_cannot_afford_the_max_wait_starts_at_once(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        run = Run(adaptive_batcher(runner, clock, max_wait_s=10.0), runner, clock)
        patient = run.submit(0)  # 10 s wait + a full batch (9 s) fits a huge budget: it waits
        assert await _pending(patient) and runner.batches == []
        hurried = run.submit(1, timeout_s=12.0)  # 10 s + 9 s would miss 12 s: start now
        await _until(lambda: len(runner.batches) == 1)
        assert runner.batches[0] == [("a", 0), ("a", 1)]
        await run.finish_batch()
        assert (await hurried).batch_size == 2
        await run.close()

    asyncio.run(scenario())


def test_cap_shrinks_when_clients_leave_mid_batch_and_recovers_when_they_stay(
    clock: FakeClock,
) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        b = adaptive_batcher(runner, clock, fixed_s=None)  # no timing model: only AIMD acts
        run = Run(b, runner, clock)
        first = [run.submit(i) for i in range(8)]
        await _until(lambda: len(runner.batches) == 1)
        for fut in first[:3]:  # three clients leave while their batch runs
            fut.cancel()
        await run.finish_batch()
        assert b.adaptive.cap("a") == 4
        sizes = []
        for round_ in range(5):  # full batches, every client stays
            futs = [run.submit(100 * round_ + i) for i in range(8)]
            await _until(lambda: b._running is not None)
            sizes.append(len(b._running.items))  # type: ignore[union-attr]
            await run.finish_batch()
            while b.depth:  # the rest of this round, at the cap
                await _until(lambda: b._running is not None)
                await run.finish_batch()
            await asyncio.gather(*futs)
        assert sizes == [4, 5, 6, 7, 8]
        assert b.adaptive.cap("a") == 8
        await run.close()

    asyncio.run(scenario())


def test_learned_patience_budgets_requests_that_name_no_timeout(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        b = adaptive_batcher(runner, clock)
        run = Run(b, runner, clock)
        busy = b.submit(("b", 0), key="b")  # another key keeps the engine busy
        await _until(lambda: len(runner.batches) == 1)
        await run.clients_give_up(5, 3.0, 0.1)  # after about 3 s in the queue
        patience = b.adaptive.patience("a", clock.now)
        assert patience is not None and 3.0 <= patience <= 3.2
        # a 4-image batch ahead (5 s) + its own 2 s: past the learned ~3 s budget
        await run.finish_batch()
        more = [run.submit(10 + i) for i in range(4)]
        await _until(lambda: len(runner.batches) == 2)
        with pytest.raises(Overloaded):
            run.submit(20, explicit=False)
        told = run.submit(21, timeout_s=60.0)  # a client that says it waits is admitted
        assert b.depth == 1
        await run.finish_batch()
        await run.finish_batch()
        await asyncio.gather(busy, *more, told)
        await run.close()

    asyncio.run(scenario())


def test_a_client_about_to_leave_does_not_get_fresh_retries_refused(clock: FakeClock) -> None:
    """Issue 18: a queued request that can no longer finish in its (learned) budget must not
    count as work ahead of a newcomer that can: the newcomer is admitted and starts first."""
    async def scenario() -> None:
        runner = HeldRunner()
        b = adaptive_batcher(runner, clock)
        run = Run(b, runner, clock)
        busy = b.submit(("b", 0), key="b")  # another key keeps the engine busy
        await _until(lambda: len(runner.batches) == 1)
        await run.clients_give_up(5, 3.0)  # patience ~3 s
        for _ in range(3):  # batches whose clients left: the cap falls 8 -> 4 -> 2 -> 1
            b.adaptive.batch_ended("a", 8, 8, clock.now)
        assert b.adaptive.cap("a") == 1
        await _until(lambda: b.depth == 0)  # the loop dropped the cancelled ones
        stale = run.submit(10, explicit=False)
        clock.now += 2.0  # 1 s of its ~3 s budget left, one image takes 2 s: hopeless
        fresh = run.submit(11, explicit=False)  # before: 2 s (stale) + 2 s (own) > 3 s, 503
        assert b.depth == 2
        await run.finish_batch()
        assert runner.batches[1] == [("a", 11)]  # the one that can make it runs first
        stale.cancel()  # its client leaves, as predicted, having cost the engine nothing
        await run.finish_batch()
        assert (await fresh).result == "img-a-11"
        await busy
        await run.close()

    asyncio.run(scenario())


def test_all_cancelled_running_batch_signals_stop_and_partly_cancelled_does_not(
    clock: FakeClock,
) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        b = adaptive_batcher(runner, clock, fixed_s=None)
        run = Run(b, runner, clock)
        checks: list[Callable[[], bool]] = []
        original = runner.__call__

        async def runner_with_stop(items: list[tuple[str, int]]) -> list[str]:
            checks.append(b.should_stop())
            return await original(items)

        b._runner = runner_with_stop
        pair = [run.submit(0), run.submit(1)]
        await _until(lambda: len(checks) == 1)
        pair[0].cancel()
        await asyncio.sleep(0)
        assert not checks[0]()  # one client still waits
        pair[1].cancel()
        await asyncio.sleep(0)
        assert checks[0]()
        await run.close()

    asyncio.run(scenario())


def test_in_flight_request_times_out_at_its_deadline_not_at_batch_end(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()
        run = Run(adaptive_batcher(runner, clock, fixed_s=None), runner, clock)
        short, long = run.submit(0, timeout_s=2.0), run.submit(1, timeout_s=100.0)
        await _until(lambda: len(runner.batches) == 1)
        clock.now += 2.0
        run.b.poke()
        with pytest.raises(QueueTimeout):
            await asyncio.wait_for(short, 1)
        assert await _pending(long)  # the batch runs on for the client still there
        await run.finish_batch()
        assert (await long).batch_size == 2
        await run.close()

    asyncio.run(scenario())


def test_drain_does_not_wait_for_a_batch_nobody_waits_for(clock: FakeClock) -> None:
    async def scenario() -> None:
        runner = HeldRunner()  # never released: the batch would hang
        b = adaptive_batcher(runner, clock, fixed_s=None)
        run = Run(b, runner, clock)
        gone = run.submit(0)
        await _until(lambda: len(runner.batches) == 1)
        gone.cancel()
        await asyncio.sleep(0)
        assert await asyncio.wait_for(b.drain(timeout_s=60), 1)
        runner.release.set()
        await asyncio.wait_for(run.task, 1)

    asyncio.run(scenario())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- through the engine: FakeEngine steps handed out by the test -----------------------------


async def eventually(predicate: Callable[[], bool], rounds: int = 2500) -> None:
    for _ in range(rounds):  # bounded: about 5 s of loop turns
        if predicate():
            return
        await asyncio.sleep(0.002)
    raise AssertionError("condition not met in time")


async def reached(steps: Steps, n: int) -> None:
    assert await asyncio.to_thread(steps.reached, n), f"engine never reached step {n}"


def test_batch_size_is_the_least_of_setting_memory_limit_and_aimd_cap() -> None:
    """One size per key for every decision: min(--max-batch-size, the out-of-memory limit
    learned by `BatchSizes`, the AIMD cap), enabled or not (the memory limit always holds)."""
    adaptive = Adaptive(max_batch_size=8)
    limit = {"a": 8}
    adaptive.size_limit = lambda key: limit["a"]
    assert adaptive.cap("a") == 8
    adaptive.state("a").aimd.clients_left()  # AIMD: 8 -> 4
    assert adaptive.cap("a") == 4
    limit["a"] = 3  # ran out of memory above 3
    assert adaptive.cap("a") == 3
    limit["a"] = 6
    assert adaptive.cap("a") == 4
    adaptive.enabled = False
    assert adaptive.cap("a") == 6
    batcher: Batcher[int, int] = Batcher(HeldRunner(), max_batch_size=8, adaptive=adaptive)
    batcher.sizes.out_of_memory("a", 4)  # the batcher wires its learned limit into the cap
    assert batcher.adaptive.cap("a") == batcher._limit("a") == 2


class SplitEngine(FakeEngine):
    """Runs out of memory above two items, before any step; smaller parts run step by step."""

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None
    ) -> list[Image.Image]:
        if len(items) > 2:
            self.batches.append(list(items))
            raise EngineOutOfMemory("CUDA out of memory")
        return super().generate(items, should_stop)


async def test_split_part_whose_clients_all_left_stops_and_the_next_part_runs() -> None:
    """The stop flag belongs to the part in the engine: its clients gone, it stops at the next
    step and is not retried smaller; the next part, whose clients wait, runs in full."""
    steps = Steps()
    engine = SplitEngine(on_step=steps)
    async with in_process(engine, max_batch_size=4, max_wait_ms=60_000) as app:
        leavers = [call_asgi(app.app, {**BODY, "seed": s}) for s in (0, 1)]
        await eventually(lambda: app.service.batcher.depth == 2)
        stayers = [asyncio.create_task(app.client.post("/t2i", json={**BODY, "seed": s}))
                   for s in (2, 3)]
        await reached(steps, 1)  # 4 ran out of memory; the part [0, 1] is at its first step
        assert [len(b) for b in engine.batches] == [4, 2]
        assert not app.service.batcher.should_stop()()
        for call in leavers:
            call.leave()
        await asyncio.wait_for(asyncio.gather(*(c.task for c in leavers)), 5)
        await eventually(app.service.batcher.should_stop())
        steps.allow(100)
        responses = await asyncio.wait_for(asyncio.gather(*stayers), 5)
        assert [r.status_code for r in responses] == [200, 200]
        assert {r.headers["x-batch-size"] for r in responses} == {"2"}
        assert [[i.seed for i in b] for b in engine.batches] == [[0, 1, 2, 3], [0, 1], [2, 3]]
        assert engine.interrupted == 1 and engine.steps_run == 1 + 10
        assert app.metric("batchserve_batches_interrupted_total") == 1
        assert app.metric("batchserve_wasted_images_total", reason="cancelled") == 0
        assert app.metric("batchserve_requests_rejected_total", reason="cancelled") == 2
        assert app.metric("batchserve_images_total") == 2
        assert app.service.batcher._limit(KEY) == 2  # learned from the out-of-memory error


async def test_all_cancelled_batch_stops_within_one_step() -> None:
    steps = Steps()
    engine = FakeEngine(on_step=steps)
    async with in_process(engine, max_batch_size=2, max_wait_ms=60_000) as app:
        calls = [call_asgi(app.app, {**BODY, "seed": s}) for s in (1, 2)]
        steps.allow(2)
        await reached(steps, 3)  # two steps done, the third waiting
        for call in calls:
            call.leave()
        await asyncio.wait_for(asyncio.gather(*(c.task for c in calls)), 5)
        await eventually(app.service.batcher.should_stop())  # the loop saw both leave
        steps.allow(1)
        await eventually(lambda: app.metric("batchserve_batches_interrupted_total") == 1)
        assert engine.steps_run == 3 and engine.interrupted == 1  # 7 of 10 steps never ran
        assert app.metric("batchserve_images_total") == 0
        assert app.metric("batchserve_wasted_images_total", reason="cancelled") == 0
        assert app.metric("batchserve_requests_rejected_total", reason="cancelled") == 2
        steps.allow(100)
        after = await app.client.post("/t2i", json={**BODY, "seed": 3})
        assert after.status_code == 200  # the engine is free again


async def test_partly_cancelled_batch_runs_on() -> None:
    steps = Steps()
    engine = FakeEngine(on_step=steps)
    async with in_process(engine, max_batch_size=2, max_wait_ms=60_000) as app:
        leaving = call_asgi(app.app, {**BODY, "seed": 1})
        staying = asyncio.create_task(app.client.post("/t2i", json={**BODY, "seed": 2}))
        steps.allow(2)
        await reached(steps, 3)
        leaving.leave()
        await asyncio.wait_for(leaving.task, 5)
        steps.allow(100)
        response = await staying
        assert response.status_code == 200 and response.headers["x-batch-size"] == "2"
        assert engine.steps_run == 10 and engine.interrupted == 0
        await eventually(lambda: app.metric("batchserve_wasted_images_total",
                                            reason="cancelled") == 1)
        assert app.metric("batchserve_batches_interrupted_total") == 0


async def test_job_canceled_mid_batch_stops_it_and_teaches_no_patience() -> None:
    steps = Steps()
    engine = FakeEngine(on_step=steps)
    async with in_process(engine, max_wait_ms=0) as app:
        job = (await app.client.post("/v1/jobs", json=BODY)).json()["id"]
        steps.allow(1)
        await reached(steps, 2)
        deleted = await app.client.delete(f"/v1/jobs/{job}")
        assert deleted.json()["status"] == "canceled"
        await eventually(app.service.batcher.should_stop())  # the loop saw it
        steps.allow(100)
        await eventually(lambda: app.metric("batchserve_batches_interrupted_total") == 1)
        assert engine.steps_run == 2
        # a job has no connection to lose patience on: nothing learned from its cancellation
        assert app.service.adaptive.state(KEY).patience.estimate(0.0) is None
        assert not app.service.adaptive.state(KEY).patience._ages


async def test_warm_up_timing_lets_the_server_refuse_an_impossible_timeout_at_once() -> None:
    engine = FakeEngine(warmup_timings={KEY: 4.0})
    async with in_process(engine, max_batch_size=4, max_wait_ms=0) as app:
        refused = await app.client.post("/t2i", json={**BODY, "timeout_s": 1.0})
        assert refused.status_code == 504
        assert refused.json()["error"]["code"] == "deadline_unreachable"
        assert engine.batches == [] and app.service.batcher.depth == 0
        assert app.metric("batchserve_requests_rejected_total", reason="deadline") == 1
        ok = await app.client.post("/t2i", json={**BODY, "timeout_s": 60.0})
        assert ok.status_code == 200
        info = (await app.client.get("/v1/info")).json()["batching"]
        assert info["adaptive_batch"] == "on"
        assert info["keys"][LABEL]["cap"] == 4


async def test_info_and_metrics_show_cap_and_patience_per_key(app_with_leavers: InProcess
                                                              ) -> None:
    app = app_with_leavers
    info = (await app.client.get("/v1/info")).json()["batching"]["keys"][LABEL]
    assert info["cap"] == 1 and info["patience_s"] is not None
    text = (await app.client.get("/metrics")).text
    assert f'batchserve_batch_cap{{key="{LABEL}"}} 1.0' in text
    assert f'batchserve_client_patience_seconds{{key="{LABEL}"}}' in text


@pytest.fixture
async def app_with_leavers() -> Any:
    """Five batches of one whose client left mid-batch: cap 8 -> 1, patience learned."""
    steps = Steps()
    engine = FakeEngine(on_step=steps)
    async with in_process(engine, max_batch_size=8, max_wait_ms=0) as app:
        for seed in range(5):
            call = call_asgi(app.app, {**BODY, "seed": seed})
            await reached(steps, 10 * seed + 1)
            call.leave()
            await asyncio.wait_for(call.task, 5)
            await eventually(app.service.batcher.should_stop())
            steps.allow(10)
            await eventually(lambda s=seed: engine.interrupted == s + 1)  # type: ignore[misc]
        yield app


# -- a real server -----------------------------------------------------------------------------


def test_sigterm_does_not_wait_for_a_batch_whose_client_hung_up(tmp_path: Path) -> None:
    # one 20 s batch of 20 one-second steps; its only client hangs up; SIGTERM must not wait
    with running_server("--model", "sim", "--sim-base-ms", "20000", "--max-batch-size", "1",
                        "--max-wait-ms", "0", tmp_path=tmp_path) as server:
        data = orjson.dumps({"prompt": "x", "width": 64, "height": 64, "inference_steps": 20})
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(b"POST /t2i HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        _wait(lambda: "batchserve_batches_total{trigger=\"full\"} 1.0" in _metrics(server.url))
        sock.close()
        _wait(lambda: 'batchserve_batches_interrupted_total 1.0' in _metrics(server.url))
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0  # well before the 20 s batch would have ended
    assert "Traceback" not in server.log_path.read_text()


def _metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=5).text


def _wait(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        done.wait(0.02)  # polling an external process, bounded
    raise AssertionError("condition not met in time")

