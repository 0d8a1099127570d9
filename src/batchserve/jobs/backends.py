"""`open_queue` / `open_store`: the backends the settings name. The shared ones (Redis, files,
S3) are imported only when named, so the default memory setup imports no redis or boto3."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .memory import MemoryQueue, MemoryResultStore

if TYPE_CHECKING:
    from ..settings import Settings
    from .protocol import JobQueue, ResultStore


def open_queue(settings: Settings) -> JobQueue:
    """Builds the queue; connects lazily (the first call reaches the server)."""
    if settings.queue == "memory":
        return MemoryQueue(
            ttl_s=settings.job_ttl_s, visibility_timeout_s=settings.job_visibility_timeout_s
        )
    from .redis import RedisQueue

    queue: JobQueue = RedisQueue(
        settings.queue,
        ttl_s=settings.job_ttl_s,
        visibility_timeout_s=settings.job_visibility_timeout_s,
        max_waiting=settings.max_jobs_waiting,
    )
    return queue


def open_store(settings: Settings) -> ResultStore:
    if settings.results == "memory":
        return MemoryResultStore(ttl_s=settings.job_ttl_s)
    scheme, _, rest = settings.results.partition("://")
    if scheme == "file":
        from .stores import FileResultStore

        files: ResultStore = FileResultStore(Path(rest), ttl_s=settings.job_ttl_s)
        return files
    from .stores import S3ResultStore

    bucket, _, prefix = rest.partition("/")
    s3: ResultStore = S3ResultStore(
        bucket, prefix.strip("/"), endpoint_url=settings.s3_endpoint_url, ttl_s=settings.job_ttl_s
    )
    return s3
