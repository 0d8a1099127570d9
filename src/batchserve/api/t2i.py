"""`POST /t2i`: batchserve's own door. JSON in, a plain image out."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..encode import MEDIA_TYPES, negotiate
from ..errors import BatchServeError
from ..schema import parse
from .common import Gateway


class T2IDoor:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = gateway.service

    async def __call__(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request)
        service.check_admitting()
        body = await gateway.read_json(request)
        try:
            req = parse(body, service.limits)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        record.update(key=req.key_label, seed=req.seed, priority=req.priority)
        if service.settings.log_prompts:
            record.update(prompt=req.prompt, negative_prompt=req.negative_prompt)
        fmt = negotiate(req.format, request.headers.get("accept"))
        try:
            future = service.submit(req, fmt)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        (outcome,) = await gateway.wait_all(request, [future])
        record.update(batch_size=outcome.batch_size, queue_ms=round(outcome.queue_s * 1000, 1),
                      inference_ms=round(outcome.inference_s * 1000, 1), format=fmt)
        content = await outcome.result  # encoded off the loop, while the next batch runs
        return Response(content, media_type=MEDIA_TYPES[fmt], headers={
            "X-Seed": str(req.seed),
            "X-Batch-Size": str(outcome.batch_size),
            "X-Queue-Ms": f"{outcome.queue_s * 1000:.1f}",
            "X-Inference-Ms": f"{outcome.inference_s * 1000:.1f}",
        })
