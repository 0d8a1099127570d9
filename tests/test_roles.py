"""`--role api` and `--role worker`: what each serves, readiness, no torch in the api process,
and an api and a worker meeting only through a shared queue and store."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from inprocess import InProcess, in_process
from test_reliability import eventually

from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.record import Status

from fakes import FakeEngine

# Valid shared-backend settings; the tests inject memory backends shared by both processes'
# services, so no Redis or S3 is needed to test the roles themselves.
SHARED = {"queue": "redis://127.0.0.1:1/0", "results": "file:///nonexistent"}
SMALL = {"prompt": "a cube", "width": 64, "height": 64, "inference_steps": 1}

NO_TORCH = textwrap.dedent("""
    import asyncio, json, sys
    import httpx
    import batchserve.cli, batchserve.server
    from batchserve.api import create_app
    from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
    from batchserve.service import Service
    from batchserve.settings import Settings

    async def main():
        settings = Settings(role="api", queue="redis://127.0.0.1:1/0", results="file:///x")
        service = Service(settings, queue=MemoryQueue(ttl_s=60, visibility_timeout_s=60),
                          store=MemoryResultStore(ttl_s=60))
        app = create_app(settings, service)
        await service.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = {"prompt": "x", "width": 64, "height": 64}
            t2i = await client.post("/t2i", json=body)
            job = await client.post("/v1/jobs", json=body)
            ready = await client.get("/readyz")
        await service.stop()
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        print(json.dumps({"t2i": [t2i.status_code, t2i.json()], "job": job.status_code,
                          "ready": ready.status_code, "heavy": heavy}))

    asyncio.run(main())
""")


def test_the_api_role_imports_no_torch_and_refuses_t2i_clearly() -> None:
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True,
                          timeout=120, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    status, body = out["t2i"]
    assert status == 503 and body["error"]["code"] == "not_served_here"
    assert "/v1/jobs" in body["error"]["message"]
    assert out["job"] == 202 and out["ready"] == 200


@asynccontextmanager
async def split(worker_engine: FakeEngine) -> AsyncIterator[tuple[InProcess, InProcess]]:
    """An api and a worker service sharing one queue and one store."""
    queue = MemoryQueue(ttl_s=3600, visibility_timeout_s=120)
    store = MemoryResultStore(ttl_s=3600)
    backends = {"queue": queue, "store": store}
    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(
            in_process(FakeEngine(), role="api", backends=backends, **SHARED))
        worker = await stack.enter_async_context(
            in_process(worker_engine, role="worker", max_wait_ms=0, backends=backends, **SHARED))
        yield api, worker


async def test_api_accepts_and_serves_jobs_a_worker_generates() -> None:
    async with split(FakeEngine()) as (api, worker):
        done = await api.client.post("/v1/jobs", json=SMALL, headers={"Prefer": "wait=30"})
        assert done.status_code == 200 and done.json()["status"] == "succeeded"
        image = await api.client.get(f"/v1/jobs/{done.json()['id']}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert api.engine.batches == [] and len(worker.engine.batches) == 1
        assert api.service.engine is None and api.service.runner is None
        assert worker.metric("batchserve_jobs_total", status="succeeded") == 1
        assert api.metric("batchserve_jobs_total", status="queued") == 1


async def test_what_each_role_serves() -> None:
    async with split(FakeEngine()) as (api, worker):
        t2i = await api.client.post("/t2i", json=SMALL)
        assert t2i.status_code == 503 and t2i.json()["error"]["code"] == "not_served_here"
        for path in ("/healthz", "/readyz", "/v1/info", "/metrics"):
            assert (await worker.client.get(path)).status_code == 200, path
            assert (await api.client.get(path)).status_code == 200, path
        assert (await worker.client.post("/t2i", json=SMALL)).status_code == 404
        assert (await worker.client.post("/v1/jobs", json=SMALL)).status_code == 404
        info = (await worker.client.get("/v1/info")).json()
        assert info["role"] == "worker" and info["jobs"]["queue"] == "redis"
        assert (await api.client.get("/readyz")).json() == {"status": "ready", "role": "api"}


async def test_a_delete_on_the_api_discards_what_the_worker_is_running() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with split(engine) as (api, worker):
        job = (await api.client.post("/v1/jobs", json=SMALL)).json()["id"]
        await asyncio.to_thread(engine.started.wait, 5)
        assert (await api.client.delete(f"/v1/jobs/{job}")).json()["status"] == "canceled"
        gate.set()
        runner = worker.service.runner
        assert runner is not None
        await eventually(lambda: runner.held == 0)
        assert (await api.service.jobs.get(job)).status is Status.CANCELED
        assert await api.service.jobs.store.get(job) is None


async def test_the_worker_is_not_ready_until_its_model_is_warm() -> None:
    gate = threading.Event()

    class SlowWarmup(FakeEngine):
        def warmup(self) -> None:
            gate.wait(10)

    import httpx

    from batchserve.api import create_app
    from batchserve.service import Service
    from batchserve.settings import Settings

    settings = Settings(model="fake", warmup="", role="worker", **SHARED)
    service = Service(settings, engine_factory=lambda _: SlowWarmup(),
                      queue=MemoryQueue(ttl_s=60, visibility_timeout_s=60),
                      store=MemoryResultStore(ttl_s=60))
    app = create_app(settings, service)
    await service.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/readyz")).status_code == 503
            gate.set()
            assert await service.wait_loaded() == Service.READY
            assert (await client.get("/readyz")).status_code == 200
    finally:
        gate.set()
        await service.stop()
