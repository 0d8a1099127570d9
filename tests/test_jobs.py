"""Async jobs on the memory backend, in process with the `FakeEngine`: submit, poll, image,
shared batches with /t2i, cancel, idempotency, `Prefer: wait`, expiry, drain, failures, bad input
and unknown ids."""

from __future__ import annotations

import asyncio
import io
import threading
from typing import Any

import httpx
import pytest
from inprocess import InProcess, in_process
from PIL import Image
from test_bad_input import CASES, COUNTED, Case, check, send
from test_reliability import eventually

from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.protocol import BackendUnavailable
from batchserve.jobs.record import JobRecord, Status, new_job_id

from fakes import FakeEngine

SMALL = {"width": 64, "height": 64, "inference_steps": 1}
GET_FIELDS = {"id", "status", "created_at", "started_at", "completed_at", "queue_position",
              "request", "result", "error"}
RESULT_FIELDS = {"url", "seed", "width", "height", "format", "batch_size", "queue_ms",
                 "inference_ms"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def submit(app: InProcess, headers: dict[str, str] | None = None,
                 **fields: Any) -> httpx.Response:
    return await app.client.post("/v1/jobs", json={"prompt": "a cube", **SMALL, **fields},
                                 headers=headers or {})


async def submitted(app: InProcess, **fields: Any) -> str:
    response = await submit(app, **fields)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def finished(app: InProcess, job_id: str) -> dict[str, Any]:
    record = await app.service.jobs.wait(job_id, 30)
    assert record.status.terminal, record
    return app.service.jobs.view(record, "http://testserver")


def prompts(engine: FakeEngine) -> list[str]:
    return [item.prompt for batch in engine.batches for item in batch]


async def test_submit_poll_and_fetch_the_image() -> None:
    async with in_process(max_wait_ms=0) as app:
        response = await submit(app, width=128, height=64, seed=7)
        assert response.status_code == 202
        body = response.json()
        assert set(body) == {"id", "status", "created_at", "urls"}
        assert body["status"] == "queued" and body["id"].startswith("job_")
        job = body["id"]
        base = f"http://testserver/v1/jobs/{job}"
        assert body["urls"] == {"get": base, "image": base + "/image", "cancel": base}
        assert response.headers["location"] == base
        await finished(app, job)
        view = (await app.client.get(f"/v1/jobs/{job}")).json()
        assert set(view) == GET_FIELDS
        assert view["status"] == "succeeded" and view["error"] is None
        assert view["queue_position"] is None
        assert view["created_at"] <= view["started_at"] <= view["completed_at"]
        assert set(view["result"]) == RESULT_FIELDS
        assert view["result"]["url"] == base + "/image"
        assert (view["result"]["seed"], view["result"]["width"], view["result"]["height"]) == (
            7, 128, 64)
        assert view["request"] == {"prompt": "a cube", "negative_prompt": "", "width": 128,
                                   "height": 64, "inference_steps": 1, "guidance_scale": 7.5,
                                   "seed": 7, "priority": 0, "timeout_s": 300.0, "format": "png",
                                   "sampler": "dpm++2m-karras"}
        image = await app.client.get(f"/v1/jobs/{job}/image")
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (128, 64)
        assert app.metric("batchserve_jobs_total", status="queued") == 1
        assert app.metric("batchserve_jobs_total", status="succeeded") == 1
        assert app.metric("batchserve_job_duration_seconds_count") == 1


async def test_the_job_image_equals_the_t2i_image_of_the_same_request() -> None:
    async with in_process(max_wait_ms=0) as app:
        body = {"prompt": "same", **SMALL, "seed": 99, "format": "webp"}
        sync = await app.client.post("/t2i", json=body)
        job = await submitted(app, **body)
        await finished(app, job)
        image = await app.client.get(f"/v1/jobs/{job}/image")
        assert image.headers["content-type"] == "image/webp"
        assert image.content == sync.content


async def test_async_and_sync_requests_of_one_key_share_a_batch() -> None:
    async with in_process(max_batch_size=4, max_wait_ms=60_000) as app:  # flushes only when full
        jobs = [await submitted(app, prompt=f"job {i}", seed=i) for i in range(2)]
        syncs = [app.client.post("/t2i", json={"prompt": f"sync {i}", **SMALL}) for i in range(2)]
        responses = await asyncio.gather(*syncs)
        assert [r.headers["x-batch-size"] for r in responses] == ["4", "4"]
        assert len(app.engine.batches) == 1
        assert sorted(prompts(app.engine)) == ["job 0", "job 1", "sync 0", "sync 1"]
        for job in jobs:
            assert (await finished(app, job))["result"]["batch_size"] == 4


async def test_a_job_keeps_its_priority_in_the_batcher() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=2, max_wait_ms=0) as app:
        first = await submitted(app, prompt="first")
        await asyncio.to_thread(engine.started.wait, 5)
        low = await submitted(app, prompt="low", priority=-5)
        high = await submitted(app, prompt="high", priority=5, width=72)  # another batch
        await eventually(lambda: app.service.batcher.depth >= 2)  # both behind `first`
        gate.set()
        for job in (first, low, high):
            await finished(app, job)
        assert prompts(engine) == ["first", "high", "low"]


async def test_prefer_wait_returns_the_finished_job_else_the_202_body() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_wait_ms=0) as app:
        gate.set()
        done = await submit(app, headers={"Prefer": "wait=30"})
        assert done.status_code == 200 and done.headers["preference-applied"] == "wait=30"
        assert set(done.json()) == GET_FIELDS and done.json()["status"] == "succeeded"
        gate.clear()
        engine.started.clear()
        late = await submit(app, headers={"Prefer": "respond-async, wait=0"})
        assert late.status_code == 202 and set(late.json()) == {"id", "status", "created_at",
                                                                "urls"}
        capped = await submit(app, headers={"Prefer": "wait=0, foo=bar"})
        assert capped.status_code == 202
        gate.set()


def test_prefer_wait_is_capped_at_60_seconds() -> None:
    from batchserve.api.jobs import _prefer_wait

    assert _prefer_wait("wait=600") == 60
    assert _prefer_wait("respond-async, wait=5") == 5
    assert _prefer_wait("wait=abc") is None and _prefer_wait(None) is None


async def test_cancel_queued_jobs_are_never_generated() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        running = await submitted(app, prompt="running")
        await asyncio.to_thread(engine.started.wait, 5)
        in_batcher = await submitted(app, prompt="in the batcher")
        await eventually(lambda: app.service.batcher.depth >= 1)
        in_queue = await submitted(app, prompt="in the queue")  # the runner holds 2 already
        view = (await app.client.get(f"/v1/jobs/{in_queue}")).json()
        assert view["status"] == "queued" and view["queue_position"] == 0
        for job in (in_batcher, in_queue):
            deleted = await app.client.delete(f"/v1/jobs/{job}")
            assert deleted.status_code == 200 and deleted.json()["status"] == "canceled"
        gate.set()
        assert (await finished(app, running))["status"] == "succeeded"
        last = await submitted(app, prompt="after")
        await finished(app, last)
        assert prompts(engine) == ["running", "after"]
        assert (await app.client.get(f"/v1/jobs/{in_queue}/image")).status_code == 409
        assert app.metric("batchserve_jobs_total", status="canceled") == 2


async def test_cancel_while_running_discards_the_result() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_wait_ms=0) as app:
        job = await submitted(app)
        await asyncio.to_thread(engine.started.wait, 5)
        assert (await app.client.get(f"/v1/jobs/{job}")).json()["status"] == "running"
        deleted = await app.client.delete(f"/v1/jobs/{job}")
        assert deleted.json()["status"] == "canceled"
        gate.set()
        other = await submitted(app)  # runs after the canceled batch ended
        await finished(app, other)
        view = await finished(app, job)
        assert view["status"] == "canceled" and view["result"] is None
        assert await app.service.jobs.store.get(job) is None
        image = await app.client.get(f"/v1/jobs/{job}/image")
        assert image.status_code == 409 and image.json()["error"]["code"] == "job_not_succeeded"


async def test_deleting_a_finished_job_deletes_its_image() -> None:
    async with in_process(max_wait_ms=0) as app:
        job = await submitted(app)
        await finished(app, job)
        deleted = await app.client.delete(f"/v1/jobs/{job}")
        assert deleted.status_code == 200 and deleted.json()["status"] == "succeeded"
        gone = await app.client.get(f"/v1/jobs/{job}/image")
        assert gone.status_code == 410 and gone.json()["error"]["code"] == "gone"


async def test_idempotency_key_returns_the_same_job() -> None:
    async with in_process(max_wait_ms=0) as app:
        first = await submit(app, headers={"Idempotency-Key": "order-17"}, prompt="one")
        again = await submit(app, headers={"Idempotency-Key": "order-17"}, prompt="one")
        other = await submit(app, headers={"Idempotency-Key": "order-18"}, prompt="two")
        plain = [await submit(app, prompt="three") for _ in range(2)]
        assert first.json()["id"] == again.json()["id"]
        ids = {first.json()["id"], other.json()["id"], *(r.json()["id"] for r in plain)}
        assert len(ids) == 4
        for job in ids:
            await finished(app, job)
        assert sorted(prompts(app.engine)) == ["one", "three", "three", "two"]
        bad = await submit(app, headers={"Idempotency-Key": "x" * 300})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "Idempotency-Key"


async def test_idempotency_keys_are_scoped_by_api_key() -> None:
    async with in_process(max_wait_ms=0, api_key="secret-key-1") as app:
        auth = {"Authorization": "Bearer secret-key-1", "Idempotency-Key": "k"}
        assert (await submit(app)).status_code == 401
        a = await submit(app, headers=auth)
        b = await submit(app, headers=auth)
        assert a.status_code == 202 and a.json()["id"] == b.json()["id"]
        record = await app.service.jobs.get(a.json()["id"])
        assert record.owner and "secret" not in record.owner
        assert (await app.client.get(f"/v1/jobs/{a.json()['id']}")).status_code == 401


async def test_jobs_and_results_expire_after_the_ttl() -> None:
    clock = FakeClock()
    backends = {"queue": MemoryQueue(ttl_s=60, visibility_timeout_s=120, clock=clock),
                "store": MemoryResultStore(ttl_s=60, clock=clock)}
    async with in_process(max_wait_ms=0, backends=backends) as app:
        job = await submitted(app)
        await finished(app, job)
        clock.now += 59
        assert (await app.client.get(f"/v1/jobs/{job}/image")).status_code == 200
        clock.now += 2
        for path in (f"/v1/jobs/{job}", f"/v1/jobs/{job}/image"):
            response = await app.client.get(path)
            assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
        assert (await app.client.delete(f"/v1/jobs/{job}")).status_code == 404


async def test_a_failed_generation_fails_the_job_with_its_error() -> None:
    def boom(items: object) -> None:
        raise RuntimeError("CUDA exploded")

    async with in_process(FakeEngine(fail=boom), max_wait_ms=0) as app:
        job = await submitted(app)
        view = await finished(app, job)
        assert view["status"] == "failed" and view["result"] is None
        assert view["error"]["code"] == "generation_failed"
        assert "CUDA" not in view["error"]["message"]  # no internals leak
        assert app.metric("batchserve_jobs_total", status="failed") == 1


async def test_past_max_attempts_a_job_fails_with_worker_lost() -> None:
    clock = FakeClock()
    queue = MemoryQueue(ttl_s=3600, visibility_timeout_s=120, clock=clock)
    job = JobRecord(new_job_id(), Status.QUEUED, 0.0, {"prompt": "x", "negative_prompt": "",
                    "width": 64, "height": 64, "inference_steps": 1, "guidance_scale": 7.5,
                    "seed": 1, "priority": 0, "timeout_s": 60.0, "format": None}, "png")
    await queue.create(job)
    for attempt in (1, 2, 3):  # three workers take it and die
        (delivery,) = await queue.pull(f"dead-{attempt}", 10, 0)
        assert delivery.attempts == attempt
        clock.now += 121
    engine = FakeEngine()
    async with in_process(engine, max_wait_ms=0, backends={"queue": queue}) as app:
        view = await finished(app, job.id)
        assert view["status"] == "failed" and view["error"]["code"] == "worker_lost"
        assert engine.batches == []
        assert await queue.pull("anyone", 10, 0) == []  # acknowledged: never delivered again


async def test_drain_finishes_held_jobs_and_leaves_the_rest_queued() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        held = [await submitted(app, prompt="a")]
        await asyncio.to_thread(engine.started.wait, 5)
        held.append(await submitted(app, prompt="b"))
        await eventually(lambda: app.service.batcher.depth >= 1)
        left = await submitted(app, prompt="c")
        drain = asyncio.create_task(app.service.drain())
        gate.set()
        assert await drain
        states = [(await app.service.jobs.get(j)).status for j in [*held, left]]
        assert states == [Status.SUCCEEDED, Status.SUCCEEDED, Status.QUEUED]
        assert await app.service.jobs.queue.waiting() == 1
        assert prompts(engine) == ["a", "b"]
        refused = await submit(app)
        assert refused.status_code == 503


async def test_drain_past_its_grace_period_hands_jobs_back() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, drain_timeout_s=0) as app:
        jobs = [await submitted(app, prompt="a")]
        await asyncio.to_thread(engine.started.wait, 5)
        jobs.append(await submitted(app, prompt="b"))
        assert not await app.service.drain()
        for job in jobs:
            record = await app.service.jobs.get(job)
            assert record.status is Status.QUEUED and record.started_at is None
        assert await app.service.jobs.queue.waiting() == 2
        gate.set()


class FlakyQueue(MemoryQueue):
    """The memory queue with a switch that makes every call fail as an unreachable server."""

    down = False

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        public = not name.startswith("_") and callable(attr) and name != "down"
        if public and super().__getattribute__("down"):
            async def unreachable(*args: Any, **kwargs: Any) -> Any:
                raise BackendUnavailable("connection refused")
            return unreachable
        return attr


async def test_backend_down_answers_503_with_retry_after_and_stores_nothing() -> None:
    queue = FlakyQueue(ttl_s=3600, visibility_timeout_s=120)
    async with in_process(max_wait_ms=0, backends={"queue": queue}) as app:
        queue.down = True
        response = await submit(app)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "backend_unavailable"
        ready = await app.client.get("/readyz")
        assert ready.status_code == 503 and "unreachable" in ready.json()["error"]["message"]
        queue.down = False
        assert await queue.waiting() == 0
        job = await submitted(app)
        assert (await finished(app, job))["status"] == "succeeded"
        assert (await app.client.get("/readyz")).status_code == 200


async def test_unknown_and_malformed_ids_are_404() -> None:
    async with in_process() as app:
        for job in ("job_" + "A" * 22, "nope", "job_%2e%2e", "x" * 500):
            for method, path in (("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/image"),
                                 ("DELETE", f"/v1/jobs/{job}")):
                response = await app.client.request(method, path)
                assert response.status_code == 404, (method, path)
                assert response.json()["error"]["code"] == "not_found"
                assert "x" * 100 not in response.text


JOB_CASES = [Case(c.id, c.body, c.status, c.code, c.field, c.headers, c.method,
                  "/v1/jobs" if c.path == "/t2i" else c.path, c.chunked) for c in CASES]


async def test_every_bad_t2i_body_is_refused_the_same_way_by_jobs() -> None:
    engine = FakeEngine()
    async with in_process(engine, max_wait_ms=0) as app:
        for case in JOB_CASES:
            check(case, await send(app.client, case))
        assert engine.batches == []
        assert await app.service.jobs.queue.waiting() == 0
        assert app.metric("batchserve_jobs_total", status="queued") == 0
        invalid = app.metric("batchserve_requests_rejected_total", reason="invalid")
        assert invalid == len(COUNTED)  # counted exactly as /t2i counts them


async def test_unknown_field_is_refused_before_anything_is_stored() -> None:
    async with in_process() as app:
        response = await submit(app, webhooks="http://x")
        assert response.status_code == 422 and response.json()["error"]["field"] == "webhooks"


async def test_metrics_show_jobs_waiting_on_scrape() -> None:
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        for _ in range(5):
            await submitted(app)
        await asyncio.to_thread(engine.started.wait, 5)
        await eventually(lambda: app.service.batcher.depth >= 1)
        text = (await app.client.get("/metrics")).text
        assert "batchserve_jobs_waiting 3.0" in text
        gate.set()


@pytest.mark.parametrize("role", ["api", "worker"])
def test_roles_need_shared_backends(role: str) -> None:
    from batchserve.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match=f"--queue=memory with --role={role}"):
        Settings(role=role)
    with pytest.raises(SettingsError, match=f"--results=memory with --role={role}"):
        Settings(role=role, queue="redis://127.0.0.1:6379/0")


async def test_a_backend_failure_after_the_job_is_stored_still_answers_202() -> None:
    class FailsAfterCreate(FlakyQueue):
        async def create(self, record: JobRecord, idempotency_key: str | None = None
                         ) -> JobRecord:
            stored = await super().create(record, idempotency_key)
            self.down = True
            return stored

    queue = FailsAfterCreate(ttl_s=3600, visibility_timeout_s=120)
    async with in_process(max_wait_ms=0, backends={"queue": queue}) as app:
        response = await submit(app, headers={"Prefer": "wait=10"})
        assert response.status_code == 202
        queue.down = False
        assert (await app.client.get(f"/v1/jobs/{response.json()['id']}")).status_code == 200


class PresigningStore(MemoryResultStore):
    """The memory store answering presigned URLs as an S3 store would."""

    async def presigned_url(self, job_id: str, expires_s: int) -> str | None:
        return f"https://s3.example/bucket/{job_id}.png?X-Amz-Expires={expires_s}"


@pytest.mark.parametrize("redirect", [True, False])
async def test_result_redirect_answers_302_to_the_presigned_url(redirect: bool) -> None:
    backends = {"store": PresigningStore(ttl_s=3600)}
    async with in_process(max_wait_ms=0, result_redirect=redirect, backends=backends) as app:
        job = await submitted(app)
        await finished(app, job)
        image = await app.client.get(f"/v1/jobs/{job}/image")
        if redirect:
            assert image.status_code == 302
            assert image.headers["location"].startswith(f"https://s3.example/bucket/{job}.png")
        else:
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        # The page's way (issue 18 item 10): its CSP (connect-src 'self') would block the 302.
        page = await app.client.get(f"/v1/jobs/{job}/image?redirect=false")
        assert page.status_code == 200 and page.content.startswith(b"\x89PNG")
        script = (await app.client.get("/static/app.js")).text
        assert "/image?redirect=false`" in script
        csp = (await app.client.get("/")).headers["content-security-policy"]
        assert "connect-src 'self'" in csp


async def test_past_max_jobs_waiting_submits_are_429_and_nothing_is_stored() -> None:
    """Issue 18 item 2: the job queue is bounded; the 429 names its code and a Retry-After."""
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, max_jobs_waiting=2) as app:
        running = await submitted(app, prompt="running")
        await asyncio.to_thread(engine.started.wait, 5)
        await submitted(app, prompt="in the batcher")
        await eventually(lambda: app.service.batcher.depth >= 1)
        waiting = [await submitted(app, prompt=f"waiting {i}") for i in range(2)]
        assert await app.service.jobs.queue.waiting() == 2
        refused = await submit(app, prompt="one too many")
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "jobs_queue_full"
        assert int(refused.headers["retry-after"]) > 0
        assert await app.service.jobs.queue.waiting() == 2
        assert app.metric("batchserve_requests_rejected_total", reason="queue_full") == 1
        # A canceled job leaves the queue: its place is free again.
        assert (await app.client.delete(f"/v1/jobs/{waiting[0]}")).status_code == 200
        admitted = await submitted(app, prompt="admitted")
        gate.set()
        for job in (running, admitted):
            assert (await finished(app, job))["status"] == "succeeded"
        assert "one too many" not in prompts(engine)
