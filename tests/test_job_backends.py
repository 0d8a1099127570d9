"""Conformance: every `JobQueue` (memory, Redis) and every `ResultStore` (memory, file, S3) keeps
the same contract, checked by one suite against real services (redis-server and SeaweedFS on
loopback, started by tests/services.py).

Time: the memory backends take an injected clock, which the suite moves; Redis and S3 keep
their own time, so there the suite uses short TTLs and polls within a deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from batchserve.errors import JobsQueueFull
from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.protocol import BackendUnavailable, Delivery, JobQueue, ResultStore
from batchserve.jobs.record import JobRecord, Status, TransitionRefused, new_job_id
from batchserve.jobs.redis import RedisQueue, max_len
from batchserve.jobs.service import JobService, input_name
from batchserve.jobs.stores import FileResultStore, S3ResultStore
from batchserve.metrics import Metrics
from batchserve.schema import Limits, validate
from batchserve.settings import Settings

from conftest import free_port
from services import RedisServer, SeaweedS3, redis_server, seaweed_s3

TTL_S = 1.0  # short enough for Redis/S3 to expire things within a test
VISIBILITY_S = 0.25  # exact in binary, so the moved clock lands on the deadline


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A backend under test and how time passes for it."""

    name: str
    clock: Clock | None  # None: the backend keeps real time

    async def elapse(self, seconds: float) -> None:
        """Lets `seconds` pass, for checks that something does NOT happen."""
        if self.clock is not None:
            self.clock.now += seconds
        else:
            await asyncio.sleep(seconds)  # the server's own time must pass; nothing to poll

    async def after(self, seconds: float, check: Callable[[], Awaitable[bool]]) -> bool:
        """Whether `check()` holds once `seconds` have passed: the injected clock is moved,
        a real backend is polled until it holds or a deadline passes."""
        if self.clock is not None:
            self.clock.now += seconds
            return await check()
        deadline = time.monotonic() + seconds + 5.0
        while not await check():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)  # polling a real server within a deadline
        return True


def record(owner: str = "", **changes: object) -> JobRecord:
    fields: dict[str, object] = {
        "id": new_job_id(), "status": Status.QUEUED, "created_at": time.time(),
        "request": {"prompt": "a cat", "width": 64, "height": 64}, "format": "png",
        "owner": owner, **changes}
    return JobRecord(**fields)  # type: ignore[arg-type]


# --- services (started once per module; each test gets a fresh key prefix or bucket) --------


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with seaweed_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


def redis_queue(url: str, **overrides: float) -> RedisQueue:
    settings = {"ttl_s": TTL_S, "visibility_timeout_s": VISIBILITY_S, **overrides}
    return RedisQueue(url, prefix=f"test-{uuid.uuid4().hex[:8]}", **settings)


@pytest.fixture(params=["memory", "redis"])
async def queue_backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[JobQueue,
                                                                              Backend]]:
    queue: JobQueue
    if request.param == "memory":
        clock = Clock()
        queue = MemoryQueue(ttl_s=TTL_S, visibility_timeout_s=VISIBILITY_S, clock=clock)
        backend = Backend("memory", clock)
    else:
        queue = redis_queue(request.getfixturevalue("redis").url)
        backend = Backend("redis", None)
    try:
        yield queue, backend
    finally:
        await queue.close()


@pytest.fixture
def queue(queue_backend: tuple[JobQueue, Backend]) -> JobQueue:
    return queue_backend[0]


# --- JobQueue: records ----------------------------------------------------------------------


async def test_create_then_get(queue: JobQueue) -> None:
    job = record(webhook="http://hooks.example/x", priority=3)
    assert await queue.create(job) == job
    assert await queue.get(job.id) == job
    assert await queue.get("job_unknown") is None


async def test_transitions_and_terminal_refusal(queue: JobQueue) -> None:
    job = await queue.create(record())
    running = await queue.transition(job.id, Status.RUNNING, started_at=5.0, attempts=1)
    assert running.status is Status.RUNNING and running.started_at == 5.0
    done = await queue.transition(job.id, Status.SUCCEEDED, completed_at=6.0)
    assert await queue.get(job.id) == done
    for status in Status:
        with pytest.raises(TransitionRefused):
            await queue.transition(job.id, status)
    assert await queue.get(job.id) == done  # nothing changed
    with pytest.raises(KeyError):
        await queue.transition("job_unknown", Status.RUNNING)


async def test_racing_final_moves_give_one_winner(queue: JobQueue) -> None:
    """Compare-and-set: a worker finishing and a client canceling at once; one of them wins and
    the stored record is the winner's."""
    for _ in range(5):
        job = await queue.create(record())
        await queue.transition(job.id, Status.RUNNING)
        results = await asyncio.gather(
            queue.transition(job.id, Status.SUCCEEDED, completed_at=1.0),
            queue.transition(job.id, Status.CANCELED, completed_at=2.0),
            return_exceptions=True)
        winners = [r for r in results if isinstance(r, JobRecord)]
        assert len(winners) == 1, results
        assert isinstance(next(r for r in results if r not in winners), TransitionRefused)
        assert await queue.get(job.id) == winners[0]


async def test_idempotency_key_is_scoped_by_owner(queue: JobQueue) -> None:
    first = await queue.create(record(owner="alice"), idempotency_key="k1")
    again = await queue.create(record(owner="alice"), idempotency_key="k1")
    assert again == first
    other_owner = await queue.create(record(owner="bob"), idempotency_key="k1")
    other_key = await queue.create(record(owner="alice"), idempotency_key="k2")
    assert len({first.id, other_owner.id, other_key.id}) == 3
    pulled = await queue.pull("w", 10, 0)
    assert sorted(d.job_id for d in pulled) == sorted([first.id, other_owner.id, other_key.id])


async def test_delete_forgets_the_job_and_its_key(queue: JobQueue) -> None:
    job = await queue.create(record(owner="a"), idempotency_key="k")
    await queue.delete(job.id)
    assert await queue.get(job.id) is None
    assert await queue.waiting() == 0
    assert await queue.pull("w", 10, 0) == []
    assert (await queue.create(record(owner="a"), idempotency_key="k")).id != job.id


# --- JobQueue: work -------------------------------------------------------------------------


async def test_pull_in_order_then_ack(queue_backend: tuple[JobQueue, Backend]) -> None:
    queue, backend = queue_backend
    jobs = [await queue.create(record()) for _ in range(3)]
    first = await queue.pull("w1", 2, 0)
    assert [d.job_id for d in first] == [j.id for j in jobs[:2]]
    assert [d.attempts for d in first] == [1, 1]
    second = await queue.pull("w2", 5, 0)
    assert [d.job_id for d in second] == [jobs[2].id]
    for delivery in (*first, *second):
        await queue.ack(delivery)
    # acknowledged work never comes back, however long we wait
    await backend.elapse(VISIBILITY_S * 2)
    assert await queue.pull("w3", 10, 0) == []


async def test_pull_blocks_until_work_arrives(queue: JobQueue) -> None:
    pulling = asyncio.create_task(queue.pull("w", 1, 3.0))
    done, _ = await asyncio.wait({pulling}, timeout=0.1)
    assert not done  # nothing to take yet: still waiting
    job = await queue.create(record())
    (delivery,) = await asyncio.wait_for(pulling, 3.0)
    assert delivery.job_id == job.id


async def test_release_hands_the_job_to_the_next_worker_at_once(queue: JobQueue) -> None:
    first, second = await queue.create(record()), await queue.create(record())
    (held,) = await queue.pull("draining", 1, 0)
    await queue.release(held)
    assert await queue.waiting() == 2
    assert await queue.position(first.id) == 0 and await queue.position(second.id) == 1
    taken = await queue.pull("other", 2, 0)
    assert [d.job_id for d in taken] == [first.id, second.id]
    assert taken[0].attempts == 1  # a release is not a failed attempt


async def test_unacknowledged_work_is_reclaimed_past_the_visibility_timeout(
        queue_backend: tuple[JobQueue, Backend]) -> None:
    queue, backend = queue_backend
    job = await queue.create(record())
    (lost,) = await queue.pull("dies", 1, 0)
    assert await queue.pull("w2", 1, 0) == []  # held, and not yet past the timeout
    attempts: list[int] = []

    async def reclaimed_by(consumer: str) -> bool:
        taken = await queue.pull(consumer, 1, 0)
        attempts.extend(d.attempts for d in taken if d.job_id == job.id)
        return bool(taken)

    assert await backend.after(VISIBILITY_S, lambda: reclaimed_by("w2"))
    assert await backend.after(VISIBILITY_S, lambda: reclaimed_by("w3"))
    assert attempts == [2, 3]  # the runner fails it past --job-max-attempts with worker_lost
    assert lost.attempts == 1


async def test_renewed_work_stays_with_its_worker_past_the_visibility_timeout(
        queue_backend: tuple[JobQueue, Backend]) -> None:
    queue, backend = queue_backend
    job = await queue.create(record())
    (held,) = await queue.pull("busy", 1, 0)
    for _ in range(3):  # held for 1.5 timeouts in all, renewed within each
        await backend.elapse(VISIBILITY_S / 2)
        assert await queue.renew("busy", [held]) == 1
        assert await queue.pull("w2", 1, 0) == []
    assert await queue.renew("w2", [held]) == 0  # only its holder renews a delivery
    # the holder goes silent: the job moves on after the timeout, as without renewals
    taken: list[Delivery] = []

    async def reclaimed() -> bool:
        taken.extend(await queue.pull("w2", 1, 0))
        return bool(taken)

    assert await backend.after(VISIBILITY_S, reclaimed)
    assert [(d.job_id, d.attempts) for d in taken] == [(job.id, 2)]
    assert await queue.renew("busy", [held]) == 0  # the woken holder renews it no more
    assert await queue.renew("w2", taken) == 1


async def test_waiting_and_position_follow_the_queue(queue: JobQueue) -> None:
    jobs = [await queue.create(record()) for _ in range(4)]
    assert await queue.waiting() == 4
    assert [await queue.position(j.id) for j in jobs] == [0, 1, 2, 3]
    (delivery,) = await queue.pull("w", 1, 0)
    assert await queue.waiting() == 3
    assert await queue.position(jobs[0].id) is None  # with a worker now
    await queue.transition(jobs[2].id, Status.CANCELED)  # a canceled job leaves the line
    assert await queue.waiting() == 2
    assert [await queue.position(j.id) for j in jobs[1:]] == [0, None, 1]
    taken = await queue.pull("w", 10, 0)
    assert [d.job_id for d in taken] == [jobs[1].id, jobs[3].id]  # never the canceled one
    await queue.ack(delivery)
    assert await queue.waiting() == 0


async def test_jobs_past_max_jobs_waiting_are_refused_on_every_queue(
        queue: JobQueue) -> None:
    """Issue 18 item 2: the bound is checked against the queue's own count (the Redis stream's
    undelivered entries, shared by every api process); a pulled or canceled job frees a place."""
    settings = Settings(model="fake", warmup="", max_jobs_waiting=2)
    jobs = JobService(settings, Metrics(1), queue, MemoryResultStore(ttl_s=TTL_S))
    limits = Limits(settings.max_pixels, settings.max_steps, settings.request_timeout_s)
    req = validate({"prompt": "a cat", "width": 64, "height": 64}, limits)
    _, second = [await jobs.submit(req, "png") for _ in range(2)]
    with pytest.raises(JobsQueueFull) as refused:
        await jobs.submit(req, "png")
    assert refused.value.status == 429 and (refused.value.retry_after_s or 0) > 0
    assert await queue.waiting() == 2
    await queue.pull("w", 1, 0)  # with a worker: no longer waiting
    await jobs.submit(req, "png")
    await jobs.cancel(second.id)
    await jobs.submit(req, "png")
    with pytest.raises(JobsQueueFull):
        await jobs.submit(req, "png")
    assert await queue.waiting() == 2


async def test_the_redis_stream_is_trimmed_far_above_the_bound(redis: RedisServer) -> None:
    """The approximate MAXLEN is only a safety net: never near `--max-jobs-waiting`."""
    assert max_len(1000) >= 100_000 and max_len(50_000) == 500_000
    queue = redis_queue(redis.url)
    queue._max_len = 10  # tiny, to see the stream trimmed at all
    try:
        for _ in range(500):
            await queue.create(record())
        length = await queue._redis.xlen(queue._stream)
        assert 10 <= length < 500
    finally:
        await queue.close()


async def test_positions_skip_canceled_jobs_ahead_and_handed_back(queue: JobQueue) -> None:
    """Issue 18 item 9 (checked): a job canceled ahead in the line, undelivered or handed back,
    is not counted in anyone's position."""
    jobs = [await queue.create(record()) for _ in range(4)]
    await queue.transition(jobs[0].id, Status.CANCELED)
    assert [await queue.position(j.id) for j in jobs] == [None, 0, 1, 2]
    (delivery,) = await queue.pull("w", 1, 0)
    await queue.release(delivery)  # back at the head of the line
    await queue.transition(jobs[1].id, Status.CANCELED)
    assert [await queue.position(j.id) for j in jobs] == [None, None, 0, 1]
    assert await queue.waiting() == 2


async def _consumers(queue: RedisQueue) -> set[str]:
    infos = await queue._redis.xinfo_consumers(queue._stream, "workers")
    return {c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in infos}


async def test_redis_consumers_leave_and_dead_ones_are_swept(redis: RedisServer) -> None:
    """Issue 18 item 9: a worker's clean stop deletes its consumer; dead consumers holding
    nothing are deleted by any worker's pull; one still holding a job is never deleted (its
    pending entry would be lost)."""
    queue = redis_queue(redis.url, visibility_timeout_s=0.2)
    try:
        for _ in range(3):
            await queue.create(record())
        (done,) = await queue.pull("done", 1, 0)
        await queue.ack(done)
        (held,) = await queue.pull("holding", 1, 0)
        (dead,) = await queue.pull("dead", 1, 0)
        await queue.ack(dead)
        assert await _consumers(queue) == {"done", "holding", "dead"}
        await queue.leave("done")
        await queue.leave("holding")  # still holds a job: kept
        assert await _consumers(queue) == {"holding", "dead"}

        async def swept() -> bool:  # Redis's own idle time: wait for it, not for a fixed time
            await queue.prune()
            return await _consumers(queue) == {"holding"}
        deadline = time.monotonic() + 5
        while not await swept():
            assert time.monotonic() < deadline, await _consumers(queue)
            await asyncio.sleep(0.05)
        (again,) = await queue.pull("live", 1, 0)  # the dead holder's job is claimed...
        assert again.job_id == held.job_id
        await queue.ack(again)
        await queue.prune()  # ...and then its name goes too
        assert await _consumers(queue) == {"live"}
    finally:
        await queue.close()


async def test_positions_after_work_is_acknowledged(queue: JobQueue) -> None:
    jobs = [await queue.create(record()) for _ in range(5)]
    for delivery in await queue.pull("w", 2, 0):
        await queue.ack(delivery)
    assert [await queue.position(j.id) for j in jobs] == [None, None, 0, 1, 2]
    later = await queue.create(record())
    assert await queue.position(later.id) == 3
    assert await queue.waiting() == 4


async def test_records_and_keys_expire(queue_backend: tuple[JobQueue, Backend]) -> None:
    queue, backend = queue_backend
    job = await queue.create(record(owner="a"), idempotency_key="k")

    async def gone() -> bool:
        return await queue.get(job.id) is None

    assert not await gone()
    assert await backend.after(TTL_S, gone)
    fresh = await queue.create(record(owner="a"), idempotency_key="k")
    assert fresh.id != job.id


async def test_a_transition_restarts_the_ttl(queue_backend: tuple[JobQueue, Backend]) -> None:
    queue, backend = queue_backend
    job = await queue.create(record())
    await backend.elapse(TTL_S * 0.75)
    await queue.transition(job.id, Status.RUNNING)
    await backend.elapse(TTL_S * 0.75)
    assert await queue.get(job.id) is not None  # 1.5 TTLs after creation, 0.75 after the move


# --- Redis only: its server going away and coming back ----------------------------------------


async def test_redis_down_raises_backend_unavailable() -> None:
    queue = RedisQueue(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60, visibility_timeout_s=1)
    try:
        job = record()
        calls: list[Callable[[], Awaitable[object]]] = [
            queue.ping, lambda: queue.create(job), lambda: queue.get(job.id),
            lambda: queue.transition(job.id, Status.RUNNING), lambda: queue.pull("w", 1, 0.1),
            lambda: queue.ack(Delivery(job.id, "1-0", 1)), queue.waiting,
            lambda: queue.position(job.id), lambda: queue.delete(job.id)]
        for call in calls:
            with pytest.raises(BackendUnavailable):
                await asyncio.wait_for(call(), 10)
    finally:
        await queue.close()


async def test_queued_jobs_survive_a_redis_restart(tmp_path: Path) -> None:
    with redis_server(tmp_path, aof=True) as server:
        queue = redis_queue(server.url, ttl_s=60)
        try:
            jobs = [await queue.create(record()) for _ in range(3)]
            (held,) = await queue.pull("w", 1, 0)
            server.kill()  # kill -9: only what the AOF holds survives
            with pytest.raises(BackendUnavailable):
                await queue.ping()
            server.start()
            assert await queue.get(jobs[0].id) == jobs[0]
            assert await queue.waiting() == 2
            taken = await queue.pull("w2", 5, 0)
            assert [d.job_id for d in taken] == [j.id for j in jobs[1:]]
            await queue.ack(held)  # the delivery made before the restart is still valid
        finally:
            await queue.close()


# --- ResultStore ------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(params=["memory", "file", "s3"])
async def store_backend(request: pytest.FixtureRequest, tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[ResultStore,
                                                                                  Clock]]:
    clock = Clock()
    store: ResultStore
    if request.param == "memory":
        store = MemoryResultStore(ttl_s=TTL_S, clock=clock)
    elif request.param == "file":
        store = FileResultStore(tmp_path / "results", ttl_s=TTL_S, clock=clock)
    else:
        s3: SeaweedS3 = request.getfixturevalue("s3")
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        store = S3ResultStore(f"b-{uuid.uuid4().hex[:12]}", "results",
                              endpoint_url=s3.endpoint_url, ttl_s=TTL_S, clock=clock)
    try:
        yield store, clock
    finally:
        await store.close()


async def test_store_put_get_delete(store_backend: tuple[ResultStore, Clock]) -> None:
    store, _ = store_backend
    await store.ping()
    job_id = new_job_id()
    assert await store.get(job_id) is None
    await store.put(job_id, PNG, "image/png")
    assert await store.get(job_id) == PNG
    await store.put(job_id, b"second", "image/png")  # a retried write replaces the first
    assert await store.get(job_id) == b"second"
    await store.delete(job_id)
    assert await store.get(job_id) is None
    await store.delete(job_id)  # deleting twice is fine


async def test_store_results_expire(store_backend: tuple[ResultStore, Clock]) -> None:
    store, clock = store_backend
    old, new = new_job_id(), new_job_id()
    await store.put(old, PNG, "image/png")
    clock.now += TTL_S * 0.6
    await store.put(new, PNG, "image/png")
    clock.now += TTL_S * 0.6
    assert await store.get(old) is None
    assert await store.get(new) == PNG
    assert await store.presigned_url(old, 60) is None


async def test_store_refuses_ids_that_could_escape(store_backend: tuple[ResultStore,
                                                                        Clock]) -> None:
    store, _ = store_backend
    if isinstance(store, MemoryResultStore):
        pytest.skip("memory keys are never paths")
    assert await store.get("../etc/passwd") is None
    with pytest.raises(ValueError):
        await store.put("../x", PNG, "image/png")


async def test_s3_presigned_url_serves_the_image(s3: SeaweedS3,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    store = S3ResultStore("presign", "p", endpoint_url=s3.endpoint_url, ttl_s=60)
    try:
        job_id = new_job_id()
        assert await store.presigned_url(job_id, 60) is None  # nothing stored yet
        await store.put(job_id, PNG, "image/png")
        url = await store.presigned_url(job_id, 60)
        assert url is not None and url.startswith(s3.endpoint_url)
        body, media_type = await asyncio.to_thread(_fetch, url)  # the signature is the key
        assert body == PNG and media_type == "image/png"
    finally:
        await store.close()


def _fetch(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read(), resp.headers["Content-Type"]


async def test_memory_and_file_stores_give_no_presigned_url(tmp_path: Path) -> None:
    for store in (MemoryResultStore(ttl_s=60), FileResultStore(tmp_path, ttl_s=60)):
        await store.put("job_x", PNG, "image/png")
        assert await store.presigned_url("job_x", 60) is None


async def test_file_store_survives_a_new_instance(tmp_path: Path) -> None:
    await FileResultStore(tmp_path, ttl_s=60).put("job_a", PNG, "image/png")
    assert await FileResultStore(tmp_path, ttl_s=60).get("job_a") == PNG


async def test_s3_bucket_is_created_with_a_lifecycle_rule(
        s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    store = S3ResultStore(bucket, "out", endpoint_url=s3.endpoint_url, ttl_s=3 * 86400)
    try:
        await store.ping()
        client = boto3.client("s3", endpoint_url=s3.endpoint_url)
        (rule,) = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        assert rule["Expiration"] == {"Days": 3}
        assert rule["Filter"] == {"Prefix": "out/"}
        client.close()
    finally:
        await store.close()


async def test_s3_down_raises_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    store = S3ResultStore("b", "p", endpoint_url=f"http://127.0.0.1:{free_port()}", ttl_s=60)
    try:
        for call in (store.ping, lambda: store.get("job_a"),
                     lambda: store.put("job_a", PNG, "image/png")):
            with pytest.raises(BackendUnavailable):
                await call()
    finally:
        await store.close()


async def test_file_store_sweeps_only_its_own_files(tmp_path: Path) -> None:
    """`--results file:///srv` shares /srv: the sweep deletes expired images and inputs of
    jobs, never another program's file however old."""
    clock = Clock()
    store = FileResultStore(tmp_path, ttl_s=TTL_S, clock=clock)
    old = new_job_id()
    await store.put(old, PNG, "image/png")
    await store.put(input_name(old), PNG, "application/octet-stream")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    os.utime(notes, (clock.now - 3 * 86400, clock.now - 3 * 86400))  # three days old
    (tmp_path / "job_short").write_bytes(b"not a job id of ours")
    os.utime(tmp_path / "job_short", (0, 0))
    clock.now += TTL_S * 2
    await store.put(new_job_id(), PNG, "image/png")  # a put runs the sweep
    assert not (tmp_path / old).exists() and not (tmp_path / input_name(old)).exists()
    assert notes.read_text() == "mine" and (tmp_path / "job_short").exists()


async def test_s3_store_without_a_prefix_installs_no_whole_bucket_rule(
        s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule on an empty prefix would expire every object in the bucket, someone else's
    included: none is installed, and an earlier version's whole-bucket rule is removed."""
    import boto3
    import botocore.exceptions

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3.endpoint_url)
    client.create_bucket(Bucket=bucket)
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [
        {"ID": "batchserve-expire-all", "Status": "Enabled", "Expiration": {"Days": 1},
         "Filter": {"Prefix": ""}}]})
    store = S3ResultStore(bucket, "", endpoint_url=s3.endpoint_url, ttl_s=86400)
    try:
        await store.ping()
        try:
            rules = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
        except botocore.exceptions.ClientError:
            rules = []
        assert [r for r in rules if r.get("Filter", {}).get("Prefix", "") == ""] == []
    finally:
        client.close()
        await store.close()
