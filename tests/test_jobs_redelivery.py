"""Two workers holding one job (the first went silent past the visibility timeout, then woke up):
generation is at-least-once, but the job ends once and keeps its image. Two in-process servers
share one queue and store; the slow worker is held inside its image write."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from inprocess import in_process

from batchserve.errors import QueueFull
from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.protocol import Delivery
from batchserve.jobs.record import Status
from batchserve.jobs.runner import JobRunner
from batchserve.jobs.service import JobService
from batchserve.metrics import Metrics
from batchserve.schema import Limits, validate
from batchserve.settings import Settings

from fakes import FakeEngine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class HeldStore:
    """`store`, with every `put` held until `release` is set (`reached` says one arrived)."""

    def __init__(self, store: MemoryResultStore) -> None:
        self.store = store
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def put(self, job_id: str, data: bytes, media_type: str) -> None:
        self.reached.set()
        await self.release.wait()
        await self.store.put(job_id, data, media_type)

    async def get(self, job_id: str) -> bytes | None:
        return await self.store.get(job_id)

    async def delete(self, job_id: str) -> None:
        await self.store.delete(job_id)

    async def presigned_url(self, job_id: str, expires_s: int) -> str | None:
        return None

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_late_second_finish_keeps_the_first_result() -> None:
    clock = Clock()
    queue = MemoryQueue(ttl_s=3600, visibility_timeout_s=120, clock=clock)
    store = MemoryResultStore(ttl_s=3600, clock=clock)
    held = HeldStore(store)
    async with in_process(backends={"queue": queue, "store": held}) as slow:
        resp = await slow.client.post("/v1/jobs", json={"prompt": "a cat", "width": 64,
                                                        "height": 64, "seed": 7})
        job_id = resp.json()["id"]
        await asyncio.wait_for(held.reached.wait(), 10)  # generated, now storing
        clock.now += 121  # ...for longer than the visibility timeout
        async with in_process(backends={"queue": queue, "store": store}) as fast:
            done = await fast.service.jobs.wait(job_id, 10)
            assert done.status is Status.SUCCEEDED
            image = await store.get(job_id)
            assert image is not None
            held.release.set()  # the slow worker's write lands; its own success is refused
    # both servers are stopped: every step of both runners has finished
    final = await queue.get(job_id)
    assert final is not None and final.status is Status.SUCCEEDED
    assert final.attempts == 2
    assert await store.get(job_id) == image  # same seed, same image; and still there


async def test_a_worker_keeps_a_long_job_by_renewing_it() -> None:
    """A job that generates for longer than the visibility timeout stays with its live worker:
    the runner's heartbeat renews it, so a second worker finds nothing to claim and the job is
    generated once."""
    clock = Clock()
    queue = MemoryQueue(ttl_s=3600, visibility_timeout_s=120, clock=clock)
    store = MemoryResultStore(ttl_s=3600, clock=clock)
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, backends={"queue": queue, "store": store}) as app:
        resp = await app.client.post("/v1/jobs", json={"prompt": "a cat", "width": 64,
                                                       "height": 64, "seed": 7})
        job_id = resp.json()["id"]
        await asyncio.to_thread(engine.started.wait, 10)  # generating, held by this worker
        runner = app.service.runner
        assert runner is not None
        for _ in range(3):  # 3 x 80 s: twice the timeout in all, renewed within each
            clock.now += 80
            assert await runner.renew() == 1
            assert await queue.pull("another-worker", 1, 0) == []
        gate.set()
        done = await app.service.jobs.wait(job_id, 10)
        assert done.status is Status.SUCCEEDED and done.attempts == 1
        assert len(engine.batches) == 1


class Refusing:
    """A generator whose batcher refuses every job (queue full), as a busy /t2i load makes it;
    after `limit` refusals it stops the runner's pulling."""

    def __init__(self, limit: int) -> None:
        self.limit, self.refused = limit, 0
        self.runner: JobRunner | None = None

    @property
    def ready(self) -> bool:
        return True

    async def wait_loaded(self) -> str:
        return "ready"

    async def prefetch_loras(self, requests: Any) -> None:
        pass

    def submit(self, request: Any, fmt: str = "png", *, online: bool = True,
               progress_key: str | None = None) -> Any:
        self.refused += 1
        if self.refused >= self.limit and self.runner is not None:
            self.runner.stop_pulling()
        raise QueueFull("queue is full", retry_after_s=3)


class CountingQueue(MemoryQueue):
    pulls = 0

    async def pull(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        self.pulls += 1
        return await super().pull(consumer, max_count, block_s)


async def test_a_refused_job_pauses_pulling_instead_of_spinning() -> None:
    """Review item 1: the job is released and the runner sleeps the refusal's Retry-After
    before pulling again (it used to pull the same job again at once, at full CPU)."""
    settings = Settings(model="fake", warmup="")
    metrics = Metrics(settings.max_batch_size)
    queue = CountingQueue(ttl_s=3600, visibility_timeout_s=120)
    jobs = JobService(settings, metrics, queue, MemoryResultStore(ttl_s=3600))
    limits = Limits(settings.max_pixels, settings.max_steps, settings.request_timeout_s)
    await jobs.submit(validate({"prompt": "a cat", "width": 64, "height": 64, "seed": 1},
                               limits), "png")
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:  # the injected clock: time passes at once
        pauses.append(seconds)
        await asyncio.sleep(0)  # still a suspension point, as the real sleep is

    generator = Refusing(limit=4)
    runner = JobRunner(generator, jobs, settings, metrics, block_s=0.01, sleep=sleep)
    generator.runner = runner
    runner.start()
    await asyncio.wait_for(_stopped(runner), 10)
    assert generator.refused == 4
    assert pauses[:3] == [3, 3, 3]  # one Retry-After between two refusals
    assert queue.pulls <= len(pauses) + 2  # no pulls beyond one per pause
    assert await queue.waiting() == 1  # the job is back in the queue, untouched
    await runner.stop()


async def _stopped(runner: JobRunner) -> None:
    if runner._loop is not None:
        await asyncio.wait([runner._loop])  # ends when the refusals stopped its pulling


class LeavingQueue(MemoryQueue):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.left: list[str] = []

    async def leave(self, consumer: str) -> None:
        self.left.append(consumer)


async def test_a_clean_stop_removes_the_workers_consumer_name() -> None:
    """Issue 18 item 9: consumer names must not pile up in a shared queue's group."""
    queue = LeavingQueue(ttl_s=3600, visibility_timeout_s=120)
    async with in_process(max_wait_ms=0, backends={"queue": queue}) as app:
        runner = app.service.jobs.runner
        assert runner is not None
        assert await app.service.drain()  # the clean stop (SIGTERM)
        assert queue.left == [runner.consumer]
