"""The two backends of the jobs API, as protocols: a durable `JobQueue` (records + the work
queue; memory or Redis Streams) and a `ResultStore` (image bytes; memory, file or S3).

Both are asyncio-facing; implementations that block (files, boto3) do so off the event loop.
Errors reaching a backend (connection refused, timeouts) are raised as `BackendUnavailable`, which
the HTTP layer turns into 503 + Retry-After (nothing was stored) and workers retry with backoff.

Shared semantics (`memory.MemoryQueue` / `MemoryResultStore` are the reference, with tests):
- Expiry: a record (with its idempotency key) and a result live `ttl_s` after their LAST write
  (create, transition, put); then `get` returns None, as for an unknown id.
- `pull` hands out a job at most once at a time: a delivery not acknowledged nor released within
  the visibility timeout goes to the next `pull` (any consumer, the same one included) with
  `attempts` + 1. The worker, not the queue, fails jobs past `--job-max-attempts`.
- `renew` is the holder's heartbeat: the visibility timeout counts from its last renewal, so
  only a worker that stopped renewing (dead, or its loop stuck) loses its jobs.
- `release` puts the job back for the next `pull` at once and does not count as an attempt.
- A job whose record is terminal (canceled while queued) may still be delivered; the worker
  checks the record and acknowledges it without running it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..progress import Progress
from .record import JobRecord, Status


class BackendUnavailable(Exception):
    """The queue or the result store cannot be reached; nothing was changed."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One job handed to one worker. `attempts` counts deliveries, this one included."""

    job_id: str
    token: str
    """Backend handle to acknowledge this delivery (a stream entry id for Redis)."""
    attempts: int


class JobQueue(Protocol):
    async def create(self, record: JobRecord, idempotency_key: str | None = None) -> JobRecord:
        """Stores `record` and enqueues it, atomically. With an idempotency key already used by
        the same owner (within the TTL), stores nothing and returns the existing job."""
        ...

    async def get(self, job_id: str) -> JobRecord | None:
        """The record, or None when unknown or expired."""
        ...

    async def transition(self, job_id: str, status: Status, **changes: object) -> JobRecord:
        """Applies `JobRecord.moved` atomically against the stored record (compare-and-set);
        raises `record.TransitionRefused` if the stored record cannot move (e.g. terminal),
        KeyError if unknown."""
        ...

    async def delete(self, job_id: str) -> None: ...

    async def pull(self, consumer: str, max_count: int, block_s: float) -> list[Delivery]:
        """Up to `max_count` deliveries for `consumer`: first jobs whose previous worker has
        held them past the visibility timeout (claimed), then new ones; waits up to `block_s`
        when there are none."""
        ...

    async def ack(self, delivery: Delivery) -> None:
        """Done with this delivery for good (after its result is stored and its record is
        terminal): it is never delivered again."""
        ...

    async def release(self, delivery: Delivery) -> None:
        """Hands a delivery back unfinished (a draining worker), for another worker now."""
        ...

    async def renew(self, consumer: str, deliveries: list[Delivery]) -> int:
        """`consumer` is still working on these: their visibility timeout starts again (a
        heartbeat). Deliveries another consumer claimed meanwhile stay theirs; returns how many
        were renewed."""
        ...

    async def leave(self, consumer: str) -> None:
        """`consumer` stops for good (a clean stop, after its held jobs were acknowledged or
        released): the queue forgets its name unless it still holds deliveries, which then stay
        pending for another worker."""
        ...

    async def waiting(self) -> int:
        """Jobs accepted and not yet pulled by any worker: what an autoscaler scales on."""
        ...

    async def waiting_by(self, tenant: str) -> int:
        """Jobs of `tenant` (`JobRecord.tenant`) still queued, pulled by a worker or not: what
        its `max_queued` counts besides its requests in this process's queue. Every api
        process sees the same count."""
        ...

    async def position(self, job_id: str) -> int | None:
        """Best-effort 0-based position among the waiting jobs, None if not waiting."""
        ...

    async def put_progress(self, job_id: str, progress: Progress) -> None:
        """Shares a running job's latest progress with other processes (best effort, bounded:
        one small value per job, expiring soon). A backend local to one process keeps none."""
        ...

    async def progress(self, job_id: str) -> Progress | None:
        """The latest progress another process shared for `job_id` (None: none, or local)."""
        ...

    async def ping(self) -> None:
        """Raises `BackendUnavailable` when the backend cannot be reached."""
        ...

    async def close(self) -> None: ...


class ResultStore(Protocol):
    async def put(self, job_id: str, data: bytes, media_type: str) -> None: ...

    async def get(self, job_id: str) -> bytes | None:
        """The image bytes, or None when absent (never stored, deleted or expired)."""
        ...

    async def delete(self, job_id: str) -> None: ...

    async def presigned_url(self, job_id: str, expires_s: int) -> str | None:
        """A URL a client can fetch the image from directly, or None (memory/file stores)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
