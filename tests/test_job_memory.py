"""The memory queue and store: the reference semantics of the `jobs.protocol` backends."""

from __future__ import annotations

import dataclasses

import pytest

from batchserve.jobs.memory import MemoryQueue, MemoryResultStore
from batchserve.jobs.record import JobRecord, Status, TransitionRefused, new_job_id


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def record(owner: str = "") -> JobRecord:
    return JobRecord(new_job_id(), Status.QUEUED, 0.0, {"prompt": "x"}, "png", owner=owner)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(clock: Clock) -> MemoryQueue:
    return MemoryQueue(ttl_s=100, visibility_timeout_s=10, clock=clock)


async def test_pull_hands_out_each_job_once_in_order(queue: MemoryQueue) -> None:
    jobs = [record() for _ in range(3)]
    for job in jobs:
        await queue.create(job)
    assert await queue.waiting() == 3 and await queue.position(jobs[2].id) == 2
    first = await queue.pull("w1", 2, 0)
    second = await queue.pull("w2", 5, 0)
    assert [d.job_id for d in first + second] == [j.id for j in jobs]
    assert {d.attempts for d in first + second} == {1}
    assert await queue.pull("w3", 5, 0) == [] and await queue.waiting() == 0


async def test_an_unacknowledged_delivery_is_claimed_after_the_visibility_timeout(
        queue: MemoryQueue, clock: Clock) -> None:
    job = record()
    await queue.create(job)
    (held,) = await queue.pull("dies", 1, 0)
    clock.now += 9.9
    assert await queue.pull("other", 1, 0) == []
    clock.now += 0.2
    (claimed,) = await queue.pull("other", 1, 0)
    assert (claimed.job_id, claimed.attempts) == (job.id, 2)
    await queue.ack(claimed)
    clock.now += 100
    assert await queue.pull("third", 1, 0) == []
    assert held.token == claimed.token


async def test_release_hands_the_job_back_first_without_counting_an_attempt(
        queue: MemoryQueue) -> None:
    a, b = record(), record()
    await queue.create(a)
    await queue.create(b)
    (delivery,) = await queue.pull("draining", 1, 0)
    await queue.release(delivery)
    assert await queue.position(a.id) == 0
    (again,) = await queue.pull("w", 1, 0)
    assert (again.job_id, again.attempts) == (a.id, 1)


async def test_transitions_are_compare_and_set_and_terminal_jobs_leave_the_line(
        queue: MemoryQueue) -> None:
    job = record()
    await queue.create(job)
    canceled = await queue.transition(job.id, Status.CANCELED, completed_at=1.0)
    assert canceled.status is Status.CANCELED and await queue.waiting() == 0
    with pytest.raises(TransitionRefused):
        await queue.transition(job.id, Status.RUNNING)
    with pytest.raises(KeyError):
        await queue.transition(new_job_id(), Status.RUNNING)
    assert await queue.get(job.id) == canceled


async def test_idempotency_keys_per_owner_expire_with_their_job(
        queue: MemoryQueue, clock: Clock) -> None:
    a = await queue.create(record("alice"), "k")
    assert await queue.create(record("alice"), "k") == a
    b = await queue.create(record("bob"), "k")
    assert b.id != a.id
    clock.now += 101
    assert await queue.get(a.id) is None
    c = await queue.create(record("alice"), "k")
    assert c.id != a.id


async def test_records_expire_ttl_after_their_last_write(
        queue: MemoryQueue, clock: Clock) -> None:
    job = await queue.create(record())
    clock.now += 90
    await queue.transition(job.id, Status.RUNNING)
    clock.now += 90
    assert await queue.get(job.id) is not None
    clock.now += 11
    assert await queue.get(job.id) is None and await queue.waiting() == 0


async def test_the_store_expires_and_deletes(clock: Clock) -> None:
    store = MemoryResultStore(ttl_s=5, clock=clock)
    await store.put("a", b"png", "image/png")
    await store.put("b", b"png", "image/png")
    await store.delete("b")
    assert await store.get("a") == b"png" and await store.get("b") is None
    assert await store.presigned_url("a", 60) is None
    clock.now += 5
    assert await store.get("a") is None


def test_a_record_round_trips_through_json() -> None:
    from batchserve.jobs.record import JobError, JobResult

    job = dataclasses.replace(record(), status=Status.SUCCEEDED,
                              result=JobResult(1, 64, 64, "png", 2, 1.5, 20.0),
                              error=JobError("x", "y"), extra={"base_url": "http://h"})
    assert JobRecord.loads(job.dumps()) == job
