"""Operations routes: liveness, readiness, info and Prometheus metrics. Never blocked by
generation (they only read state)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotReady
from ..service import Service
from .common import Gateway, JSONResponse, error_response


class OpsRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = gateway.service

    async def healthz(self, request: Request) -> Response:
        alive = self.service.state != Service.FAILED
        return JSONResponse({"status": "ok" if alive else "failed"},
                            status_code=200 if alive else 503)

    async def readyz(self, request: Request) -> Response:
        problem = await self.service.readiness()
        if problem is None:
            return JSONResponse({"status": "ready", "role": self.service.role})
        return error_response(NotReady(problem, retry_after_s=5))

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.service.info())

    async def loras(self, request: Request) -> Response:
        """The files of `--lora-dir` a request's `loras` may name, each usable or not (with the
        reason) and whether its adapter is resident now; open like /v1/info."""
        return JSONResponse(self.service.lora_listing())

    async def metrics(self, request: Request) -> Response:
        if self.service.settings.protect_metrics:
            self.gateway.authorize(request)
        engine = self.service.engine
        if engine is not None:
            self.service.metrics.gpu_memory(engine.memory_bytes())
        await self.service.jobs.refresh_metrics()
        body = generate_latest(self.service.metrics.registry)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})
