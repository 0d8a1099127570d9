"""The embedded backends: a `JobQueue` and a `ResultStore` living in this process's memory.

They serve `--queue memory` / `--results memory` (the default, one process, jobs lost on restart)
and behave like the shared ones where it matters to callers: records and results expire
`ttl_s` after their last write, a delivery held past `visibility_timeout_s` goes to the next
`pull`, and `release` puts a job back at the head of the line. Time comes from `clock`, so tests
move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..progress import Progress
from .protocol import Delivery
from .record import JobRecord, Status

Clock = Callable[[], float]


class _Expiring:
    """Keys with a deadline each; a min-heap finds the expired ones without scanning all."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._deadline: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def touch(self, key: str, ttl_s: float) -> None:
        deadline = self._clock() + ttl_s
        self._deadline[key] = deadline
        heapq.heappush(self._heap, (deadline, key))

    def forget(self, key: str) -> None:
        self._deadline.pop(key, None)

    def expired(self) -> list[str]:
        """Keys past their deadline (each reported once), oldest first."""
        now, out = self._clock(), []
        while self._heap and self._heap[0][0] <= now:
            deadline, key = heapq.heappop(self._heap)
            if self._deadline.get(key) == deadline:  # else touched again since, or forgotten
                del self._deadline[key]
                out.append(key)
        return out


@dataclass(slots=True)
class _Held:
    job_id: str
    consumer: str
    since: float


class MemoryQueue:
    def __init__(
        self, *, ttl_s: float, visibility_timeout_s: float, clock: Clock = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.visibility_timeout_s = visibility_timeout_s
        self._clock = clock
        self._records: dict[str, JobRecord] = {}
        self._expiry = _Expiring(clock)
        self._keys: dict[tuple[str, str], str] = {}
        self._key_of: dict[str, tuple[str, str]] = {}
        self._waiting: deque[str] = deque()
        self._held: dict[str, _Held] = {}  # by token
        self._attempts: dict[str, int] = {}
        self._tokens = itertools.count(1)
        self._arrived = asyncio.Event()

    def _purge(self) -> None:
        for job_id in self._expiry.expired():
            self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        self._records.pop(job_id, None)
        self._expiry.forget(job_id)
        self._attempts.pop(job_id, None)
        with contextlib.suppress(ValueError):
            self._waiting.remove(job_id)
        if (key := self._key_of.pop(job_id, None)) is not None:
            self._keys.pop(key, None)

    def _store(self, record: JobRecord) -> None:
        self._records[record.id] = record
        self._expiry.touch(record.id, self.ttl_s)

    async def create(self, record: JobRecord, idempotency_key: str | None = None) -> JobRecord:
        self._purge()
        if idempotency_key is not None:
            key = (record.owner, idempotency_key)
            if (existing := self._keys.get(key)) is not None:
                return self._records[existing]
            self._keys[key] = record.id
            self._key_of[record.id] = key
        self._store(record)
        self._waiting.append(record.id)
        self._arrived.set()
        return record

    async def get(self, job_id: str) -> JobRecord | None:
        self._purge()
        return self._records.get(job_id)

    async def transition(self, job_id: str, status: Status, **changes: object) -> JobRecord:
        self._purge()
        if (record := self._records.get(job_id)) is None:
            raise KeyError(job_id)
        moved = record.moved(status, **changes)
        self._store(moved)
        if moved.status.terminal:
            with contextlib.suppress(ValueError):
                self._waiting.remove(job_id)
        return moved

    async def delete(self, job_id: str) -> None:
        self._forget(job_id)

    async def pull(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        out = self._take(consumer, max_count)
        if out or block_s <= 0:
            return out
        self._arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._arrived.wait(), block_s)
        return self._take(consumer, max_count)

    def _take(self, consumer: str, max_count: int) -> list[Delivery]:
        self._purge()
        now, out = self._clock(), list[Delivery]()
        for token, held in self._held.items():
            if len(out) >= max_count:
                return out
            if now - held.since >= self.visibility_timeout_s:  # its worker went silent
                held.consumer, held.since = consumer, now
                out.append(self._deliver(token, held.job_id))
        while self._waiting and len(out) < max_count:
            job_id = self._waiting.popleft()
            token = str(next(self._tokens))
            self._held[token] = _Held(job_id, consumer, now)
            out.append(self._deliver(token, job_id))
        return out

    def _deliver(self, token: str, job_id: str) -> Delivery:
        attempts = self._attempts.get(job_id, 0) + 1
        self._attempts[job_id] = attempts
        return Delivery(job_id, token, attempts)

    async def ack(self, delivery: Delivery) -> None:
        self._held.pop(delivery.token, None)

    async def release(self, delivery: Delivery) -> None:
        """Back to the head of the line; a release is not a failed attempt."""
        if self._held.pop(delivery.token, None) is None:
            return
        if delivery.job_id in self._records:
            self._attempts[delivery.job_id] = max(0, delivery.attempts - 1)
            self._waiting.appendleft(delivery.job_id)
            self._arrived.set()

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> int:
        now, renewed = self._clock(), 0
        for delivery in deliveries:
            held = self._held.get(delivery.token)
            if held is not None and held.consumer == consumer:
                held.since = now
                renewed += 1
        return renewed

    async def leave(self, consumer: str) -> None:
        pass  # consumers are not registered: a delivery names its holder, nothing else does

    async def waiting(self) -> int:
        self._purge()
        return len(self._waiting)

    async def waiting_by(self, tenant: str) -> int:
        self._purge()
        return sum(r.status is Status.QUEUED and r.tenant == tenant
                   for r in self._records.values())

    async def position(self, job_id: str) -> int | None:
        try:
            return self._waiting.index(job_id)
        except ValueError:
            return None

    async def put_progress(self, job_id: str, progress: Progress) -> None:
        pass  # one process: the progress board is read directly

    async def progress(self, job_id: str) -> Progress | None:
        return None

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


class MemoryResultStore:
    def __init__(self, *, ttl_s: float, clock: Clock = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._data: dict[str, bytes] = {}
        self._expiry = _Expiring(clock)

    def _purge(self) -> None:
        for job_id in self._expiry.expired():
            self._data.pop(job_id, None)

    async def put(self, job_id: str, data: bytes, media_type: str) -> None:
        self._purge()
        self._data[job_id] = data
        self._expiry.touch(job_id, self.ttl_s)

    async def get(self, job_id: str) -> bytes | None:
        self._purge()
        return self._data.get(job_id)

    async def delete(self, job_id: str) -> None:
        self._data.pop(job_id, None)
        self._expiry.forget(job_id)

    async def presigned_url(self, job_id: str, expires_s: int) -> str | None:
        return None

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass
