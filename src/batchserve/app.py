"""The HTTP layer: Starlette routes, the one JSON error shape, and the request log line."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .batcher import Outcome
from .encode import MEDIA_TYPES, negotiate
from .errors import (
    BatchServeError,
    BodyTooLarge,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Unauthorized,
    UnsupportedMediaType,
)
from .metrics import instrument
from .schema import Limits, T2IRequest, parse
from .service import Service
from .settings import Settings

log = logging.getLogger("batchserve.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: BatchServeError) -> Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    if isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


class Api:
    def __init__(self, service: Service) -> None:
        self.service = service
        s = service.settings
        self.limits = Limits(s.max_pixels, s.max_steps, s.request_timeout_s)

    # -- /t2i ------------------------------------------------------------------------------

    async def t2i(self, request: Request) -> Response:
        rid = request.headers.get("x-request-id", "")
        rid = rid if _REQUEST_ID.match(rid) else f"{random.getrandbits(64):016x}"
        record: dict[str, Any] = {"id": rid}
        started = time.perf_counter()
        try:
            response = await self._t2i(request, record)
        except BatchServeError as exc:
            record["error"] = exc.code
            response = error_response(exc)
        except Exception:  # a bug, not a domain error: still one clean answer and one log line
            logging.getLogger("batchserve").exception("request %s failed unexpectedly", rid)
            self.service.metrics.rejected("failed")
            record["error"] = BatchServeError.code
            response = error_response(BatchServeError("internal server error"))
        response.headers["X-Request-Id"] = rid
        record["status"] = response.status_code
        record["total_ms"] = round((time.perf_counter() - started) * 1000, 1)
        log.info("request", extra={"fields": record})
        return response

    async def _t2i(self, request: Request, record: dict[str, Any]) -> Response:
        self._authorize(request)
        self.service.check_admitting()
        try:
            body = await self._read_body(request)
            req = parse(body, self.limits)
        except BatchServeError as exc:
            self.service.metrics.rejected(exc.reject_reason or "invalid")
            raise
        record.update(key=f"{req.width}x{req.height}x{req.inference_steps}x{req.guidance_scale:g}",
                      seed=req.seed, priority=req.priority)
        if self.service.settings.log_prompts:
            record.update(prompt=req.prompt, negative_prompt=req.negative_prompt)
        fmt = negotiate(req.format, request.headers.get("accept"))
        outcome = await self._generate(request, req, fmt)
        record.update(batch_size=outcome.batch_size, queue_ms=round(outcome.queue_s * 1000, 1),
                      inference_ms=round(outcome.inference_s * 1000, 1), format=fmt)
        content = await outcome.result  # encoded off the loop, while the next batch runs
        return Response(content, media_type=MEDIA_TYPES[fmt], headers={
            "X-Seed": str(req.seed),
            "X-Batch-Size": str(outcome.batch_size),
            "X-Queue-Ms": f"{outcome.queue_s * 1000:.1f}",
            "X-Inference-Ms": f"{outcome.inference_s * 1000:.1f}",
        })

    async def _generate(
        self, request: Request, req: T2IRequest, fmt: str
    ) -> Outcome[asyncio.Future[bytes]]:
        try:
            future = self.service.submit(req, fmt)
        except BatchServeError as exc:
            if exc.reject_reason:
                self.service.metrics.rejected(exc.reject_reason)
            raise
        # The client leaving cancels the future, which drops the item from the queue (or
        # discards its result mid-batch). Callbacks, not asyncio.wait: this runs per request.
        watcher = asyncio.create_task(_disconnected(request))
        watcher.add_done_callback(lambda _: future.cancel())
        try:
            return await future
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled():
                raise _ClientGone() from None
            raise  # we were cancelled ourselves
        finally:
            future.cancel()
            watcher.cancel()

    async def _read_body(self, request: Request) -> bytes:
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {media or 'none'}"
            )
        limit = self.service.settings.max_body_bytes
        too_large = BodyTooLarge(f"request body exceeds {limit} bytes")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise _ClientGone() from None
        return b"".join(chunks)

    def _authorize(self, request: Request) -> None:
        key = self.service.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), key.encode()
        ):
            raise Unauthorized("missing or wrong API key (Authorization: Bearer <key>)")

    # -- the rest --------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        alive = self.service.state != Service.FAILED
        return JSONResponse({"status": "ok" if alive else "failed"}, status_code=200 if alive
                            else 503)

    async def readyz(self, request: Request) -> Response:
        state = self.service.state
        if state == Service.READY:
            return JSONResponse({"status": "ready"})
        return error_response(NotReady(f"server is {state}", retry_after_s=5))

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.service.info())

    async def metrics(self, request: Request) -> Response:
        if self.service.settings.protect_metrics:
            self._authorize(request)
        engine = self.service.engine
        if engine is not None:
            self.service.metrics.gpu_memory(engine.memory_bytes())
        body = generate_latest(self.service.metrics.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class _ClientGone(BatchServeError):
    status, code, reject_reason = 499, "client_closed_request", "cancelled"

    def __init__(self) -> None:
        super().__init__("client disconnected before its image was ready")


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone. The body is already read, so the next ASGI message
    can only be `http.disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BatchServeError)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"no route {request.url.path}"))
    if exc.status_code == 405:
        return error_response(MethodNotAllowed(f"{request.method} not allowed here"))
    return error_response(BatchServeError(str(exc.detail)))


async def _on_unknown_error(request: Request, exc: Exception) -> Response:
    logging.getLogger("batchserve").error("unhandled error", exc_info=exc)
    return error_response(BatchServeError("internal server error"))


def create_app(settings: Settings, service: Service | None = None) -> Starlette:
    service = service or Service(settings)
    api = Api(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            Route("/t2i", api.t2i, methods=["POST"]),
            Route("/healthz", api.healthz, methods=["GET"]),
            Route("/readyz", api.readyz, methods=["GET"]),
            Route("/v1/info", api.info, methods=["GET"]),
            Route("/metrics", api.metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={
            BatchServeError: _on_domain_error,
            HTTPException: _on_http_error,
            Exception: _on_unknown_error,
        },
    )
    app.state.service = service
    instrument(app, service.metrics)
    return app
