"""What every door shares: the JSON response, the error shape, auth, body reading, waiting for an
outcome while watching the client, and the one request log line.

A door is a translation: it parses its own wire shape into `schema.T2IRequest`s, submits them to
the one `Service`, and renders outcomes (and errors) in its own shape. Everything else lives here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from starlette.datastructures import FormData
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .. import tenants
from ..batcher import Outcome
from ..errors import (
    BatchServeError,
    GenerationFailed,
    Overloaded,
    QueueFull,
    QueueTimeout,
    Unauthorized,
    UnsupportedMediaType,
)
from ..jobs.record import JobRecord, Status
from ..schema import T2IRequest
from ..service import Service
from . import uploads

log = logging.getLogger("batchserve.access")
X = TypeVar("X")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")

ErrorRenderer = Callable[[BatchServeError], Response]
Handler = Callable[[Request, dict[str, Any]], Awaitable[Response]]
"""A door's handler: the request, and the request-log record it may add fields to."""


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_headers(exc: BatchServeError) -> dict[str, str]:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_response(exc: BatchServeError) -> Response:
    """batchserve's own error shape: `{"error": {"code", "message", "field"}}`."""
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=error_headers(exc))


class ClientGone(BatchServeError):
    status, code, reject_reason = 499, "client_closed_request", "cancelled"

    def __init__(self) -> None:
        super().__init__("client disconnected before its image was ready")


@dataclass(frozen=True, slots=True)
class Generated:
    """One finished image of a client request, with what its batch looked like."""

    request: T2IRequest
    content: bytes
    batch_size: int
    queue_ms: float
    inference_ms: float


REFUSALS = frozenset({"queue_full", "overloaded", "draining", "not_ready", "too_many_jobs"})
"""Error codes of requests refused for capacity or state: cheap alone, but a client retrying
at once makes a thousand a second, so their log lines are sampled (`RefusalLog`)."""


class Gateway:
    """The shared parts of every door, bound to the one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.refusal_log = RefusalLog(service.settings.log_refusals_per_s)

    @property
    def metrics(self) -> Any:
        return self.service.metrics

    def endpoint(
        self, door: str, handler: Handler, render: ErrorRenderer = error_response
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wraps a door's handler: request id, one log line naming the door, domain errors in
        the door's shape, and a clean 500 for anything unexpected."""

        async def serve(request: Request) -> Response:
            rid = request.headers.get("x-request-id", "")
            rid = rid if _REQUEST_ID.fullmatch(rid) else f"{random.getrandbits(64):016x}"
            record: dict[str, Any] = {"id": rid, "door": door}
            started = time.perf_counter()
            try:
                response = await handler(request, record)
            except BatchServeError as exc:
                record["error"] = exc.code
                response = render(exc)
            except Exception:  # a bug, not a domain error: still one clean answer and one log
                logging.getLogger("batchserve").exception("request %s failed unexpectedly", rid)
                self.metrics.rejected("failed")
                record["error"] = BatchServeError.code
                response = render(BatchServeError("internal server error"))
            response.headers["X-Request-Id"] = rid
            record["status"] = response.status_code
            record["total_ms"] = round((time.perf_counter() - started) * 1000, 1)
            if record.get("error") not in REFUSALS or self.refusal_log.take(record):
                log.info("request", extra={"fields": record})
            return response

        return serve

    def authorize(self, request: Request, *, basic: bool = False) -> str:
        """`Authorization: Bearer <key>`; with `basic`, also HTTP Basic with the key as the
        password (any user name), which is how A1111 clients send their `--api-auth`. Returns
        the key's tenant (`--api-keys`; `default` for `--api-key`; "" without keys) and makes
        it the current one (`tenants.CURRENT`) for the rest of this request."""
        table = self.service.tenants
        if table is None:
            tenants.CURRENT.set(tenants.ANONYMOUS)
            return tenants.ANONYMOUS
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        scheme, given = scheme.lower(), given.strip()
        if basic and scheme == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                given = ""
        elif scheme != "bearer":
            given = ""
        tenant = table.lookup(given) if given else None
        if tenant is None:
            how = "Bearer <key>, or Basic with the key as password" if basic else "Bearer <key>"
            raise Unauthorized(f"missing or wrong API key (Authorization: {how})")
        tenants.CURRENT.set(tenant.name)
        return tenant.name

    async def read_json(self, request: Request, *, images: tuple[str, ...] = ()) -> bytes:
        """The raw JSON body within `--max-body-bytes`, or within `--max-image-bytes` when it
        carries one of the image fields `images` (see `uploads`); rejections are counted as
        invalid."""
        try:
            return await self._read_json(request, images)
        except BatchServeError as exc:
            self.metrics.rejected(exc.reject_reason or "invalid")
            raise

    async def _read_json(self, request: Request, images: tuple[str, ...]) -> bytes:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {media or 'none'}"
            )
        settings = self.service.settings
        try:
            return await uploads.read_json(
                request, text_limit=settings.max_body_bytes,
                image_limit=settings.max_image_bytes, image_fields=images)
        except ClientDisconnect:
            raise ClientGone() from None

    async def read_form(self, request: Request) -> FormData:
        """A multipart body within `--max-image-bytes` (`uploads.read_form`); rejections are
        counted as invalid. The caller closes it."""
        try:
            try:
                return await uploads.read_form(request, self.service.settings.max_image_bytes)
            except ClientDisconnect:
                raise ClientGone() from None
        except BatchServeError as exc:
            self.metrics.rejected(exc.reject_reason or "invalid")
            raise

    async def validated(self, parse: Callable[[], X], *, images: bool) -> X:
        """A door's translation into requests; refusals are counted. With `images` it runs in
        the service's decode pool: decoding an init image blocks for up to a few hundred ms,
        which the event loop (every other client's answers) must not wait for."""
        try:
            if not images:
                return parse()
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.service.decoder, parse)
        except BatchServeError as exc:
            raise self.rejecting(exc) from None

    def rejecting(self, exc: BatchServeError) -> BatchServeError:
        """Counts a refused request under its reason and returns the error to raise."""
        if exc.reject_reason:
            self.metrics.rejected(exc.reject_reason)
        return exc

    def check_admitting(self) -> None:
        """For OpenAI and A1111, whose clients wait for the image and cannot poll: a `--role api`
        process takes them over the jobs queue (see `generate`); `/t2i` uses
        `service.check_admitting`, which refuses on api."""
        if self.service.role == "api":
            self.service.check_accepting_jobs()
        else:
            self.service.check_admitting()

    async def generate(
        self, request: Request, reqs: list[T2IRequest], fmt: str, record: dict[str, Any]
    ) -> list[Generated]:
        """Queues a client request's images together, waits for all of them while watching the
        client, and fills the request log: what every door does between parsing and rendering."""
        head = reqs[0]
        record.update(key=head.key_label, seed=head.seed, priority=head.priority)
        if len(reqs) > 1:
            record["images"] = len(reqs)
        if self.service.settings.log_prompts:
            record.update(prompt=head.prompt, negative_prompt=head.negative_prompt)
        if self.service.role == "api":  # see check_admitting
            return await self._generate_via_jobs(request, reqs, fmt, record)
        outcomes = await self.wait_all(request, await self.admit_all(reqs, fmt))
        done = [
            Generated(req, await o.result,  # encoded off the loop, while the next batch runs
                      o.batch_size, round(o.queue_s * 1000, 1), round(o.inference_s * 1000, 1))
            for req, o in zip(reqs, outcomes, strict=True)
        ]
        record.update(batch_size=max(g.batch_size for g in done), format=fmt,
                      queue_ms=max(g.queue_ms for g in done),
                      inference_ms=max(g.inference_ms for g in done))
        return done

    async def _generate_via_jobs(
        self, request: Request, reqs: list[T2IRequest], fmt: str, record: dict[str, Any]
    ) -> list[Generated]:
        """A `--role api` process has no model: a door whose clients cannot poll (OpenAI, A1111)
        runs its images as jobs on the workers and answers when they end. The images are read
        back and the jobs deleted at once: nobody will ask for them by id."""
        jobs = self.service.jobs
        ended = await self.run_jobs(request, reqs, fmt, record)
        try:
            done = []
            for req, job in zip(reqs, ended, strict=True):
                result = job.result
                assert result is not None  # run_jobs returns succeeded jobs only
                done.append(Generated(req, await jobs.image(job.id), result.batch_size,
                                      result.queue_ms, result.inference_ms))
        finally:
            for job in ended:
                await jobs.cancel(job.id)  # a succeeded job: deletes its stored image
        record.update(batch_size=max(g.batch_size for g in done), format=fmt,
                      queue_ms=max(g.queue_ms for g in done),
                      inference_ms=max(g.inference_ms for g in done))
        return done

    async def run_jobs(
        self, request: Request, reqs: list[T2IRequest], fmt: str, record: dict[str, Any]
    ) -> list[JobRecord]:
        """Submits one job per image (all or none) and waits, within each request's timeout_s
        and while the client stays, until all have succeeded; a failure is this request's
        error. A client that leaves cancels the jobs."""
        jobs, base = self.service.jobs, str(request.base_url)
        submitted: list[JobRecord] = []
        try:
            await self.service.admit_tenant(len(reqs), max((r.priority for r in reqs), default=0))
            for req in reqs:
                submitted.append(await jobs.submit(req, fmt, base_url=base))
        except BatchServeError as exc:
            for job in submitted:
                await jobs.cancel(job.id)
            raise self.rejecting(exc) from None
        record["jobs"] = [job.id for job in submitted]
        waits: list[asyncio.Future[JobRecord]] = [
            asyncio.ensure_future(jobs.wait(job.id, req.timeout_s))
            for job, req in zip(submitted, reqs, strict=True)]
        try:
            ended = await self.wait_all(request, waits)
        except ClientGone:
            for job in submitted:
                await jobs.cancel(job.id)
            raise
        for job in ended:
            if job.status is Status.SUCCEEDED:
                continue
            if job.status.terminal:
                raise GenerationFailed(job.error.message if job.error else f"job {job.status}")
            raise QueueTimeout(f"job {job.id} did not finish within its timeout_s; it may still "
                               f"run: poll {jobs.urls(job.id, base)['get']}")
        return ended

    async def admit_all(
        self, requests: list[T2IRequest], fmt: str
    ) -> list[asyncio.Future[Outcome[asyncio.Future[bytes]]]]:
        """`submit_all`, held in the service's waiting room while the queue is full or
        overloaded (`--refusal-hold-s`): a client that retries at once on a refusal then
        waits for a place instead of making the next request straight away."""
        try:
            # the tenant's limits once, before any LoRA file is read or a place waited for
            await self.service.admit_tenant(len(requests),
                                            max((r.priority for r in requests), default=0))
            await self.service.prefetch_loras(requests)
            return await self.service.waiting_room.admit(
                lambda: self.submit_all(requests, fmt), (QueueFull, Overloaded))
        except BatchServeError as exc:
            raise self.rejecting(exc) from None

    def submit_all(
        self, requests: list[T2IRequest], fmt: str
    ) -> list[asyncio.Future[Outcome[asyncio.Future[bytes]]]]:
        """Queues every image of one client request, or none: when one is refused (queue full,
        draining) the ones already queued are cancelled, so nothing runs for an answer nobody
        gets. They all enter the batcher at once, so they can share a batch. Refusals are
        raised uncounted (`admit_all` counts the last one)."""
        batcher, limit = self.service.batcher, self.service.settings.max_queue
        if len(requests) > 1 and batcher.depth + len(requests) > limit:
            raise QueueFull(
                f"queue is full ({limit} requests waiting; this request needs "
                f"{len(requests)} places)", retry_after_s=batcher.retry_after_s(),
            )
        futures: list[asyncio.Future[Outcome[asyncio.Future[bytes]]]] = []
        try:
            for req in requests:
                futures.append(self.service.submit(req, fmt))
        except BatchServeError:
            for future in futures:
                future.cancel()
            raise
        return futures

    async def wait_all(self, request: Request, futures: list[asyncio.Future[X]]) -> list[X]:
        """Awaits every future while watching the client: its leaving cancels all of them,
        which drops queued items (or discards their results mid-batch)."""
        watcher = asyncio.create_task(_disconnected(request))

        def cancel_all(_: object) -> None:
            for future in futures:
                future.cancel()

        watcher.add_done_callback(cancel_all)  # callbacks, not asyncio.wait: runs per request
        try:
            if len(futures) == 1:
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():
                raise ClientGone() from None
            raise  # we were cancelled ourselves
        finally:
            cancel_all(None)
            watcher.cancel()


class RefusalLog:
    """At most `per_s` refused requests' log lines a second (a token bucket holding one
    second's worth); each written line carries `suppressed`, how many refusals since the last
    line went unwritten. They are all counted in `batchserve_requests_rejected_total`."""

    def __init__(self, per_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s, self._clock = per_s, clock
        self._tokens, self._at, self.suppressed = max(per_s, 1.0), clock(), 0

    def take(self, record: dict[str, Any]) -> bool:
        """True: write this refusal's line (with `suppressed` added when some were not)."""
        now = self._clock()
        self._tokens = min(max(self.per_s, 1.0), self._tokens + (now - self._at) * self.per_s)
        self._at = now
        if self._tokens < 1:
            self.suppressed += 1
            return False
        self._tokens -= 1
        if self.suppressed:
            record["suppressed"], self.suppressed = self.suppressed, 0
        return True


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone. The body is already read, so the next ASGI message
    can only be `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
