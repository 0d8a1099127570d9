"""How a batch recovers from engine failures, end to end through the service: nothing of a failed
attempt outlives it, split halves are answered and reported as they really ran, the limit learned
per shape is kept and shown, and every admitted request ends in exactly one counted outcome."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from inprocess import call_asgi, in_process
from PIL import Image

from batchserve.batcher import Batcher, Outcome
from batchserve.engines import GenerationItem, StopCheck
from batchserve.errors import EngineOutOfMemory
from batchserve.worker import Worker

from fakes import FakeEngine

BASE = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "inference_steps": 1}


def body(seed: int, **fields: Any) -> dict[str, Any]:
    return {**BASE, "seed": seed, **fields}


class Activations:
    """Stands for the tensors of one engine call."""


class MemoryHungryEngine(FakeEngine):
    """Runs out of memory above `fits` items, or whenever a `huge` prompt is in the batch; each
    call allocates `Activations` that only its own frame references, as a UNet's would be."""

    def __init__(self, fits: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.fits = fits
        self.attempts: list[weakref.ref[Activations]] = []
        self.alive_at_start: list[int] = []

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.attempts)

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None
    ) -> list[Image.Image]:
        self.alive_at_start.append(self.alive())
        activations = Activations()
        self.attempts.append(weakref.ref(activations))
        if len(items) > self.fits or any(i.prompt == "huge" for i in items):
            self.batches.append(list(items))
            raise EngineOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().generate(items, should_stop)


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Only reference counting frees memory: a reference cycle through a traceback (which the
    collector would break at some later time) keeps the attempt alive and fails the test."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def post(app: Any, payload: dict[str, Any]) -> asyncio.Task[Any]:
    return asyncio.create_task(app.client.post("/t2i", json=payload))


def counter(app: Any, reason: str | None = None) -> float:
    if reason is None:
        return float(app.metric("batchserve_images_total"))
    return float(app.metric("batchserve_requests_rejected_total", reason=reason))


# -- out of memory: nothing of a failed attempt is alive when its retry starts ---------------


async def test_out_of_memory_retry_starts_with_the_failed_attempt_released(no_gc: None) -> None:
    engine = MemoryHungryEngine(fits=1)
    async with in_process(engine, max_batch_size=4, max_wait_ms=60_000) as app:
        responses = await asyncio.gather(
            *(post(app, body(n, prompt="huge" if n == 3 else "fox")) for n in range(4)))
        assert [r.status_code for r in responses] == [200, 200, 200, 500]
        # 4 -> 2 -> 1 + 1, 2 -> 1 + 1(huge): every call began with no earlier call alive
        assert [len(b) for b in engine.batches] == [4, 2, 1, 1, 2, 1, 1]
        assert engine.alive_at_start == [0] * 7
        assert engine.alive() == 0  # and the last, failed, attempt is gone after the batch


async def test_worker_thread_keeps_nothing_of_its_last_job(no_gc: None) -> None:
    """A batch's images must not stay alive in the engine thread until the next batch."""
    worker = Worker("test-worker")
    try:
        result = await worker.run(Activations)
        ref = weakref.ref(result)
        del result
        await _until(lambda: ref() is None)  # the thread may still be returning from the job
    finally:
        worker.stop()


# -- out of memory: halves answered as they end; the learned limit ---------------------------


async def test_split_halves_are_answered_as_they_end_with_their_real_size() -> None:
    second_half = threading.Event()

    def hold_second_half(items: Sequence[GenerationItem]) -> None:
        if items[0].seed >= 2:
            second_half.wait(timeout=30)

    engine = MemoryHungryEngine(fits=2, fail=hold_second_half)
    async with in_process(engine, max_batch_size=4, max_wait_ms=60_000) as app:
        tasks = [post(app, body(n)) for n in range(4)]
        first = await asyncio.wait_for(asyncio.gather(*tasks[:2]), 5)
        assert not any(t.done() for t in tasks[2:])  # answered while the other half runs
        assert [r.status_code for r in first] == [200, 200]
        assert {r.headers["x-batch-size"] for r in first} == {"2"}
        second_half.set()
        rest = await asyncio.wait_for(asyncio.gather(*tasks[2:]), 5)
        assert {r.headers["x-batch-size"] for r in rest} == {"2"}
        # the second half's queue time runs until its own part started, so it includes the whole
        # first half (all four were queued before the batch began; headers round to 0.1 ms).
        # Comparing with the first half's queue time instead would race the enqueue spread.
        assert min(float(r.headers["x-queue-ms"]) for r in rest) >= max(
            float(r.headers["x-inference-ms"]) for r in first) - 0.1


async def test_learned_limit_stops_later_batches_of_the_shape_from_splitting() -> None:
    engine = MemoryHungryEngine(fits=2)
    async with in_process(engine, max_batch_size=4, max_wait_ms=60_000) as app:
        await asyncio.gather(*(post(app, body(n)) for n in range(4)))
        assert [len(b) for b in engine.batches] == [4, 2, 2]
        again = await asyncio.gather(*(post(app, body(n)) for n in range(4)))
        assert [r.status_code for r in again] == [200] * 4
        assert [len(b) for b in engine.batches] == [4, 2, 2, 2, 2]  # no attempt at 4 again
        assert app.metric("batchserve_batch_size_limit", shape="64x64x1x7.5/dpm++2m-karras") == 2
        info = (await app.client.get("/v1/info")).json()
        assert info["batching"]["size_limits"] == {"64x64x1x7.5/dpm++2m-karras": 2}


def test_batcher_reports_the_learned_limit_under_the_key_label() -> None:
    limits: list[tuple[str, int]] = []

    class Hooks:
        def __getattr__(self, name: str) -> Callable[..., None]:
            return lambda *a: limits.append(a) if name == "size_limit" else None

    async def runner(items: list[int]) -> list[int]:
        if len(items) > 1:
            raise EngineOutOfMemory("oom")
        return items

    async def scenario() -> list[Outcome[int]]:
        batcher: Batcher[int, int] = Batcher(runner, max_batch_size=2, max_wait_s=0,
                                             hooks=Hooks(), key_label=lambda k: f"shape-{k}")
        task = asyncio.create_task(batcher.run())
        futures = [batcher.submit(n, key=(64, 64)) for n in range(2)]
        outcomes = list(await asyncio.gather(*futures))
        batcher.close()
        await task
        return outcomes

    outcomes = asyncio.run(scenario())
    assert [(o.result, o.batch_size) for o in outcomes] == [(0, 1), (1, 1)]
    assert limits == [("shape-(64, 64)", 1)]


# -- accounting ------------------------------------------------------------------------------


async def test_counters_add_up_under_a_mix_of_outcomes(monkeypatch: pytest.MonkeyPatch) -> None:
    """admitted = images + failed + timeout + cancelled (+ drained, deadline when they occur):
    each admitted request is counted once,
    whatever its end (poison, out of memory alone, encode failure, queue timeout, a client
    leaving while queued or mid-batch)."""
    gate, hold = threading.Event(), threading.Event()
    encoded: list[int] = []

    def misbehave(items: Sequence[GenerationItem]) -> None:
        if items[0].seed == 20:
            hold.wait(timeout=30)
        if any(i.prompt == "poison" for i in items):
            raise RuntimeError("bad item")

    def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
        red = image.getpixel((0, 0))[0]  # FakeEngine paints seed % 256
        encoded.append(red)
        if red == 66:
            raise OSError("disk full")
        return b"image"

    monkeypatch.setattr("batchserve.service.encode", encode)
    engine = MemoryHungryEngine(fits=8, gate=gate, fail=misbehave)
    async with in_process(engine, max_batch_size=4, max_wait_ms=0) as app:
        blocker = post(app, body(0))  # holds the engine while the rest queues behind it
        await _until(lambda: len(engine.batches) == 1)
        mix = [post(app, body(1)), post(app, body(2, prompt="poison")),
               post(app, body(3, prompt="huge")), post(app, body(66))]
        queued_leaver = call_asgi(app.app, body(10, width=128))
        await _until(lambda: app.service.batcher.depth == 5)
        queued_leaver.leave()
        await asyncio.wait_for(queued_leaver.task, 5)
        late = await asyncio.wait_for(post(app, body(4, width=256, timeout_s=0.01)), 5)
        assert late.status_code == 504
        gate.set()
        responses = await asyncio.wait_for(asyncio.gather(blocker, *mix), 5)
        assert [r.status_code for r in responses] == [200, 200, 500, 500, 500]
        mid_batch_leaver = call_asgi(app.app, body(20, width=192))
        await _until(lambda: engine.batches[-1][0].seed == 20)
        mid_batch_leaver.leave()
        await asyncio.wait_for(mid_batch_leaver.task, 5)
        hold.set()
        await _until(lambda: counter(app, "cancelled") == 2)
        batcher = app.service.batcher
        await _until(lambda: batcher.depth == 0 and not batcher.queue.inflight)
        admitted = app.metric("batchserve_requests_admitted_total")
        outcomes = {"images": counter(app), "failed": counter(app, "failed"),
                    "timeout": counter(app, "timeout"), "cancelled": counter(app, "cancelled")}
        assert outcomes == {"images": 2, "failed": 3, "timeout": 1, "cancelled": 2}
        assert admitted == 8 == sum(outcomes.values())
        assert 20 not in encoded and 10 not in encoded  # the leavers' images: never encoded
        # generated and not delivered = wasted: only the mid-batch leaver's image (the queued
        # leaver's never ran); images_total counts delivered images only
        assert app.metric("batchserve_wasted_images_total", reason="cancelled") == 1
        assert encoded.count(66) == 1


async def test_drain_cut_off_counts_as_drained_not_cancelled() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, drain_timeout_s=0.05) as app:
        accepted = [post(app, body(n)) for n in range(2)]
        await _until(lambda: len(engine.batches) == 1 and app.service.batcher.depth == 1)
        assert await asyncio.wait_for(app.service.drain(), 5) is False
        assert [r.status_code for r in await asyncio.gather(*accepted)] == [503, 503]
        assert counter(app, "drained") == 2 and counter(app, "cancelled") == 0
        assert app.metric("batchserve_requests_admitted_total") == 2


async def test_gpu_gauges_follow_each_batch_peak() -> None:
    """The service reads the engine's per-batch peak after every batch; the registry is read
    directly, so no /metrics scrape can have set the gauges."""

    class MeasuredEngine(FakeEngine):
        def memory_bytes(self) -> tuple[int, int] | None:
            return 1000 * len(self.batches[-1]) if self.batches else 0, 5000

    engine = MeasuredEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=2, max_wait_ms=0) as app:
        first = post(app, body(1))
        await _until(lambda: len(engine.batches) == 1)
        assert app.metric("batchserve_gpu_memory_allocated_bytes") == 0
        rest = [post(app, body(2)), post(app, body(3))]
        await _until(lambda: app.service.batcher.depth == 2)
        assert engine.gate is not None
        engine.gate.set()
        await asyncio.gather(first, *rest)
        assert [len(b) for b in engine.batches] == [1, 2]
        assert app.metric("batchserve_gpu_memory_allocated_bytes") == 2000
        assert app.metric("batchserve_gpu_memory_reserved_bytes") == 5000


def _poison(items: Sequence[GenerationItem]) -> None:
    if any(i.prompt == "poison" for i in items):
        raise RuntimeError("bad item")


async def _until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)
