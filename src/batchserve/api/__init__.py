"""The HTTP layer: one module per door (`t2i`, ...), the shared parts in `common`, the
operations routes in `ops`, and `create_app` assembling them into one Starlette app."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..errors import BatchServeError, MethodNotAllowed, NotFound
from ..metrics import instrument
from ..service import Service
from ..settings import Settings
from . import a1111, openai
from .a1111 import A1111Door
from .common import Gateway, Handler, error_response
from .jobs import JobsDoor
from .openai import OpenAIDoor
from .ops import OpsRoutes
from .page import PageRoutes
from .t2i import T2IDoor

__all__ = ["create_app"]


def routes(gateway: Gateway) -> list[BaseRoute]:
    """Every role serves the operations routes; a `--role worker` process serves only them."""
    ops = OpsRoutes(gateway)
    served: list[BaseRoute] = [
        Route("/healthz", ops.healthz, methods=["GET"]),
        Route("/readyz", ops.readyz, methods=["GET"]),
        Route("/v1/info", ops.info, methods=["GET"]),
        Route("/v1/loras", ops.loras, methods=["GET"]),
        Route("/metrics", ops.metrics, methods=["GET"]),
    ]
    if gateway.service.role == "worker":
        return served
    jobs = JobsDoor(gateway)
    oai = OpenAIDoor(gateway)
    sd = A1111Door(gateway)

    def jobs_route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, gateway.endpoint("jobs", handler), methods=[method])

    def openai_route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, gateway.endpoint("openai", handler, openai.render_error),
                     methods=[method])

    def a1111_route(path: str, handler: Handler, method: str) -> Route:
        return Route(f"/sdapi/v1/{path}", gateway.endpoint("a1111", handler, a1111.render_error),
                     methods=[method])

    return [
        Route("/t2i", gateway.endpoint("t2i", T2IDoor(gateway)), methods=["POST"]),
        jobs_route("/v1/jobs", jobs.submit, "POST"),
        jobs_route("/v1/jobs/{job_id}", jobs.get, "GET"),
        jobs_route("/v1/jobs/{job_id}", jobs.cancel, "DELETE"),
        jobs_route("/v1/jobs/{job_id}/image", jobs.image, "GET"),
        jobs_route("/v1/jobs/{job_id}/events", jobs.events, "GET"),
        openai_route("/v1/images/generations", oai.generations, "POST"),
        openai_route("/v1/images/edits", oai.edits, "POST"),
        openai_route("/v1/models", oai.models, "GET"),
        a1111_route("txt2img", sd.txt2img, "POST"),
        a1111_route("img2img", sd.img2img, "POST"),
        a1111_route("sd-models", sd.sd_models, "GET"),
        a1111_route("samplers", sd.samplers, "GET"),
        a1111_route("loras", sd.loras, "GET"),
        a1111_route("refresh-loras", sd.refresh_loras, "POST"),
        a1111_route("schedulers", sd.schedulers, "GET"),
        a1111_route("options", sd.get_options, "GET"),
        a1111_route("options", sd.set_options, "POST"),
        a1111_route("progress", sd.progress, "GET"),
        a1111_route("interrupt", sd.interrupt, "POST"),
        *served,
        *PageRoutes(gateway).routes(),
    ]


async def _on_domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BatchServeError)
    return error_response(exc)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound(f"no route {request.url.path}"))
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed(f"{request.method} not allowed here"))
        response.headers.update(exc.headers or {})  # keeps `Allow`
        return response
    return error_response(BatchServeError(str(exc.detail)))


async def _on_unknown_error(request: Request, exc: Exception) -> Response:
    logging.getLogger("batchserve").error("unhandled error", exc_info=exc)
    return error_response(BatchServeError("internal server error"))


def create_app(settings: Settings, service: Service | None = None) -> Starlette:
    service = service or Service(settings)
    gateway = Gateway(service)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=routes(gateway),
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
