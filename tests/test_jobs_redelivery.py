"""Two workers holding one job (the first went silent past the visibility timeout, then woke up):
generation is at-least-once, but the job ends once and keeps its image. Two in-process servers
share one queue and store; the slow worker is held inside its image write."""

from __future__ import annotations

import asyncio
import threading

from inprocess import in_process

from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.record import Status

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
