"""`JobService`: the asynchronous path every door uses, reachable as `service.jobs`.

Contract (doors rely on exactly this; raised errors are `errors.BatchServeError`s the gateway
renders in the door's shape):

- `await jobs.submit(req, fmt, *, owner="", idempotency_key=None, webhook=None, base_url="")`
  -> `JobRecord` (status `queued`). `req` is the one validated `schema.T2IRequest`; `fmt` the
  image format. `owner` scopes `idempotency_key` (a digest of the API key, "" without auth): the
  same key returns the existing job, whatever the body. `webhook` must already be checked
  (`webhooks.check_url`). `base_url` is where clients reach this API (the webhook body's URLs).
  503 (`NotReady`/`Draining`/`BackendDown`, with Retry-After) and 429 (`JobsQueueFull`, once
  `--max-jobs-waiting` jobs wait in the queue, shared or not) mean nothing was stored.
- `await jobs.get(job_id)` -> `JobRecord`; `NotFound` (404) for unknown, malformed or expired ids.
- `await jobs.wait(job_id, timeout_s)` -> `JobRecord`, as soon as it is terminal or at the
  timeout. In one process (memory queue) it sleeps until the job ends; with a shared queue it
  polls with backoff (50 ms -> 1 s).
- `await jobs.cancel(job_id)` -> `JobRecord`: a queued job becomes `canceled` and is never
  generated; a running one becomes `canceled` and its result is discarded; a finished one keeps
  its status and its result is deleted (its image then answers `Gone`, 410).
- `await jobs.image(job_id)` -> the image bytes (`image_file`: `(bytes, media_type)`);
  `JobNotFinished` (409) unless succeeded, `Gone` (410) once deleted.
  `await jobs.image_redirect(job_id)` -> a presigned URL (`--result-redirect`) or None.
- `jobs.view(record, base_url, queue_position=None)` -> the `GET /v1/jobs/{id}` JSON;
  `jobs.summary(record, base_url)` -> the `202` JSON; `jobs.image_path(job_id)` ->
  `"/v1/jobs/{id}/image"`; `await jobs.position(record)` -> best-effort queue position.

Every state change made in this process goes through `transition`, the one place with the side
effects of a job ending: waking `wait`ers, metrics, the webhook, deleting its input image.

A job's init image (img2img, inpainting) does not bloat its record: the record's request holds
its size, `strength` and `mask_blur`, and the pixels (`T2IRequest.pixels()`) live in the result
store as `input_name(job_id)` (`<job id>-input`, a name in the store's own scheme that no job id
can take), written before the record and with the same TTL, read by the worker that runs the
job (`inputs`), and deleted when the job ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import tenants
from ..encode import MEDIA_TYPES
from ..errors import BackendDown, Gone, JobNotFinished, JobsQueueFull, NotFound
from ..progress import Progress
from .protocol import BackendUnavailable, JobQueue, ResultStore
from .record import JobRecord, Status, TransitionRefused, new_job_id
from .webhooks import PROGRESS_EVERY_S, WebhookSender

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..schema import T2IRequest
    from ..settings import Settings
    from .runner import JobRunner

log = logging.getLogger("batchserve.jobs")
_ID = re.compile(r"job_[A-Za-z0-9_-]{22}")
PREFER_WAIT_MAX_S = 60
PRESIGNED_EXPIRES_S = 300
INPUT_MEDIA_TYPE = "application/octet-stream"
# A full job queue drains at the engines' pace, minutes for a thousand jobs: a client polling
# faster than this only adds load.
JOBS_FULL_RETRY_AFTER_S = 30


def input_name(job_id: str) -> str:
    """Where a job's input pixels live in the result store: job ids are `job_` and 22 URL-safe
    characters, so `<job id>-input` is never another job's name."""
    return f"{job_id}-input"


@contextlib.contextmanager
def backend_errors() -> Iterator[None]:
    """`BackendUnavailable` as the domain error the doors render: 503 + Retry-After."""
    try:
        yield
    except BackendUnavailable as exc:
        log.warning("job backend unavailable: %s", exc)
        raise BackendDown(
            "the job queue or result store is unreachable; nothing was changed, retry later",
            retry_after_s=5,
        ) from None


class JobService:
    """The jobs API of one process over its queue and store (the contract: module docstring)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        queue: JobQueue,
        store: ResultStore,
        *,
        admit: Callable[[], None] = lambda: None,
        webhooks: WebhookSender | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`admit` raises the 503 that refuses a new job (not ready, draining, wrong role): the
        process's own lifecycle, which this module is handed rather than imports."""
        self.settings = settings
        self.metrics = metrics
        self._admit = admit
        self.queue = queue
        self.store = store
        self.webhooks = webhooks
        self.runner: JobRunner | None = None
        self._clock = clock
        # With the memory queue every change happens in this process, so waiters are woken
        # and never poll; with a shared queue other processes change records too.
        self._local = settings.queue == "memory"
        self._ended: dict[str, asyncio.Event] = {}
        self._waiters: dict[str, int] = {}
        self._closing = False
        self.progress_source: Callable[[str], Progress | None] | None = None
        """A running job's progress here (the service's board), for `progress` webhooks."""
        self.progress_webhook_s = PROGRESS_EVERY_S
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self._progress_hooks: dict[str, asyncio.Future[None]] = {}

    # -- the contract ------------------------------------------------------------------------

    async def submit(
        self,
        req: T2IRequest,
        fmt: str,
        *,
        owner: str = "",
        idempotency_key: str | None = None,
        webhook: str | None = None,
        base_url: str = "",
        webhook_events: Sequence[str] = ("completed",),
    ) -> JobRecord:
        self._admit()
        await self._check_room()
        extra: dict[str, Any] = {"base_url": base_url.rstrip("/")}
        if webhook is not None and tuple(webhook_events) != ("completed",):
            extra["webhook_events"] = list(webhook_events)  # absent: completed only, as before
        record = JobRecord(
            id=new_job_id(), status=Status.QUEUED, created_at=self._clock(),
            request=req.fields(), format=fmt, owner=owner, webhook=webhook,
            priority=req.priority, extra=extra, tenant=tenants.CURRENT.get(),
        )
        pixels = req.pixels()
        if pixels is not None:  # before the record: a worker never sees a job without its input
            with backend_errors():
                await self.store.put(input_name(record.id), pixels, INPUT_MEDIA_TYPE)
        try:
            with backend_errors():
                stored = await self.queue.create(record, idempotency_key)
        except BaseException:
            if pixels is not None:
                await self._drop_input(record.id)
            raise
        if stored.id == record.id:
            self.metrics.job_status(Status.QUEUED)
        elif pixels is not None:  # the idempotency key named an existing job: ours is unused
            await self._drop_input(record.id)
        return stored

    async def _check_room(self) -> None:
        """429 once `--max-jobs-waiting` jobs wait. Counted on the queue itself (the Redis
        stream's undelivered entries for a shared one), so every api process sees the same
        bound; two processes may both pass at the edge, so the bound is approximate by the
        number of concurrent submits, which the stream's MAXLEN safety net absorbs."""
        limit = self.settings.max_jobs_waiting
        with backend_errors():
            waiting = await self.queue.waiting()
        if waiting >= limit:
            raise JobsQueueFull(
                f"{waiting} jobs are already waiting (--max-jobs-waiting {limit}); retry later",
                retry_after_s=JOBS_FULL_RETRY_AFTER_S)

    async def inputs(self, record: JobRecord) -> bytes | None:
        """The pixels of the job's init image and mask, or None for a job without one or once
        they are gone (expired with the job, or deleted when it ended). `BackendUnavailable`
        when the store cannot be reached."""
        if record.request.get("init_image") is None:
            return None
        return await self.store.get(input_name(record.id))

    async def get(self, job_id: str) -> JobRecord:
        if not _ID.fullmatch(job_id):
            raise NotFound("no such job (malformed id)")
        with backend_errors():
            record = await self.queue.get(job_id)
        if record is None:
            raise NotFound(f"no job {job_id} (unknown or expired)")
        return record

    async def wait(self, job_id: str, timeout_s: float) -> JobRecord:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        delay = 0.05
        self._waiters[job_id] = self._waiters.get(job_id, 0) + 1
        ended = self._ended.setdefault(job_id, asyncio.Event())  # before reading: no lost wakeup
        try:
            while True:
                record = await self.get(job_id)
                left = deadline - loop.time()
                if record.status.terminal or left <= 0 or self._closing:
                    return record
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ended.wait(), left if self._local else min(left, delay))
                delay = min(delay * 2, 1.0)
        finally:
            self._waiters[job_id] -= 1
            if not self._waiters[job_id]:
                del self._waiters[job_id]
                self._ended.pop(job_id, None)

    async def cancel(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if not record.status.terminal:
            try:
                record = await self.transition(job_id, Status.CANCELED,
                                               completed_at=self._clock())
            except TransitionRefused:
                record = await self.get(job_id)  # it ended meanwhile
            if self.runner is not None:
                self.runner.cancel_local(job_id)
        if record.status is Status.SUCCEEDED:
            with backend_errors():
                await self.store.delete(job_id)
        return record

    async def image(self, job_id: str) -> bytes:
        return (await self.image_file(job_id))[0]

    async def image_file(self, job_id: str) -> tuple[bytes, str]:
        """The image and its media type."""
        record = await self._succeeded(job_id)
        with backend_errors():
            data = await self.store.get(job_id)
        if data is None:
            raise Gone(f"the image of job {job_id} was deleted")
        return data, MEDIA_TYPES[record.format]

    async def image_redirect(self, job_id: str) -> str | None:
        """A presigned URL for the image when `--result-redirect` is on and the store has one."""
        if not self.settings.result_redirect:
            return None
        await self._succeeded(job_id)
        with backend_errors():
            return await self.store.presigned_url(job_id, PRESIGNED_EXPIRES_S)

    async def position(self, record: JobRecord) -> int | None:
        if record.status is not Status.QUEUED:
            return None
        try:
            return await self.queue.position(record.id)
        except BackendUnavailable:
            return None  # best effort

    @staticmethod
    def image_path(job_id: str) -> str:
        return f"/v1/jobs/{job_id}/image"

    def urls(self, job_id: str, base_url: str) -> dict[str, str]:
        base = base_url.rstrip("/")
        return {"get": f"{base}/v1/jobs/{job_id}", "image": base + self.image_path(job_id),
                "cancel": f"{base}/v1/jobs/{job_id}"}

    def summary(self, record: JobRecord, base_url: str) -> dict[str, Any]:
        """The `202 Accepted` body."""
        return {"id": record.id, "status": str(record.status),
                "created_at": _iso(record.created_at), "urls": self.urls(record.id, base_url)}

    def view(
        self, record: JobRecord, base_url: str, queue_position: int | None = None
    ) -> dict[str, Any]:
        """The `GET /v1/jobs/{id}` body (also the webhook body)."""
        result = error = None
        if (r := record.result) is not None:
            result = {"url": base_url.rstrip("/") + self.image_path(record.id), "seed": r.seed,
                      "width": r.width, "height": r.height, "format": r.format,
                      "batch_size": r.batch_size, "queue_ms": r.queue_ms,
                      "inference_ms": r.inference_ms}
        if (e := record.error) is not None:
            error = {"code": e.code, "message": e.message}
        return {
            "id": record.id,
            "status": str(record.status),
            "created_at": _iso(record.created_at),
            "started_at": _iso(record.started_at),
            "completed_at": _iso(record.completed_at),
            "queue_position": queue_position if record.status is Status.QUEUED else None,
            "request": {**record.request, "format": record.format},
            "result": result,
            "error": error,
        }

    # -- for the runner and the service ------------------------------------------------------

    def now(self) -> float:
        """Wall-clock seconds for the records' timestamps (injectable)."""
        return self._clock()

    async def transition(self, job_id: str, status: Status, **changes: Any) -> JobRecord:
        """`queue.transition` plus, when the job ends here, its side effects. Raises
        `TransitionRefused`, `BackendUnavailable`, or `NotFound` when the record is gone."""
        try:
            record = await self.queue.transition(job_id, status, **changes)
        except KeyError:
            raise NotFound(f"no job {job_id} (unknown or expired)") from None
        if record.status.terminal:
            # The input goes first: whoever waits on the job's end may look at the store.
            if record.request.get("init_image") is not None:
                await self._drop_input(record.id)
            self._ended_here(record)
        elif status is Status.RUNNING and record.webhook and self.webhooks is not None:
            wanted = _webhook_events(record)
            if "started" in wanted:
                self.webhooks.send(record.webhook, record.id, self._hook_body(record),
                                   "started")
            if "progress" in wanted and self.progress_source is not None:
                self._progress_hooks[record.id] = asyncio.ensure_future(
                    self._progress_webhooks(record))
        return record

    def _hook_body(self, record: JobRecord, **more: Any) -> dict[str, Any]:
        return {**self.view(record, str(record.extra.get("base_url", ""))), **more}

    async def _progress_webhooks(self, record: JobRecord) -> None:
        """A running job's step, at most every `progress_webhook_s`, while it runs here."""
        source, sender = self.progress_source, self.webhooks
        assert source is not None and sender is not None and record.webhook
        sent = 0
        while True:
            await self._sleep(self.progress_webhook_s)
            progress = source(record.id)
            if progress is None or progress.step <= sent:
                continue
            sent = progress.step
            sender.send(record.webhook, record.id,
                        self._hook_body(record, progress=progress.to_dict()), "progress")

    async def _drop_input(self, job_id: str) -> None:
        """Best effort: a store that cannot be reached now lets the input expire with the job."""
        try:
            await self.store.delete(input_name(job_id))
        except BackendUnavailable as exc:
            log.warning("deleting the input image of job %s failed (it expires with the job's "
                        "TTL): %s", job_id, exc)

    def _ended_here(self, record: JobRecord) -> None:
        if (ended := self._ended.get(record.id)) is not None:
            ended.set()
        if (hooks := self._progress_hooks.pop(record.id, None)) is not None:
            hooks.cancel()
        finished = record.completed_at if record.completed_at is not None else self._clock()
        self.metrics.job_status(record.status, max(0.0, finished - record.created_at))
        if record.webhook and self.webhooks is not None \
                and "completed" in _webhook_events(record):
            self.webhooks.send(record.webhook, record.id, self._hook_body(record))

    def stop_waiting(self) -> None:
        """Ends every `wait` now with the job as it is (the server is about to exit: a
        `Prefer: wait` answer then says 202 rather than being cut off)."""
        self._closing = True
        for ended in self._ended.values():
            ended.set()

    async def check_backends(self, *, store: bool = True) -> str | None:
        """None when the queue (and the store) answer within 2 s, else why not."""
        try:
            async with asyncio.timeout(2):
                await self.queue.ping()
                if store:
                    await self.store.ping()
        except (BackendUnavailable, TimeoutError) as exc:
            return f"job backend unreachable: {exc or 'timeout'}"
        return None

    async def refresh_metrics(self) -> None:
        """Updates `batchserve_jobs_waiting` (called on each scrape)."""
        try:
            async with asyncio.timeout(2):
                waiting = await self.queue.waiting()
        except (BackendUnavailable, TimeoutError):
            return
        self.metrics.jobs_waiting(waiting)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Lets webhooks in flight finish (up to `timeout_s`), then closes the backends."""
        if self.webhooks is not None:
            await self.webhooks.close(timeout_s)
        for backend in (self.queue, self.store):
            try:
                await backend.close()
            except Exception:
                log.exception("closing a job backend failed (ignored)")

    async def _succeeded(self, job_id: str) -> JobRecord:
        record = await self.get(job_id)
        if record.status is not Status.SUCCEEDED:
            raise JobNotFinished(f"job {job_id} is {record.status}; only a succeeded job has "
                                 "an image")
        return record


def _webhook_events(record: JobRecord) -> tuple[str, ...]:
    return tuple(record.extra.get("webhook_events", ("completed",)))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")
