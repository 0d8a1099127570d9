"""`POST /t2i`: batchserve's own door. JSON in, a plain image out."""

from __future__ import annotations

from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..encode import MEDIA_TYPES, negotiate
from ..errors import BatchServeError
from ..schema import IMAGE_FIELDS, decode, has_images, validate
from .common import Gateway


class T2IDoor:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = gateway.service

    async def __call__(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request)
        service.check_admitting()
        body = await gateway.read_json(request, images=IMAGE_FIELDS)
        try:
            data = decode(body)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        req = await gateway.validated(partial(validate, data, service.limits),
                                      images=has_images(data))
        fmt = negotiate(req.format, request.headers.get("accept"))
        (image,) = await gateway.generate(request, [req], fmt, record)
        return Response(image.content, media_type=MEDIA_TYPES[fmt], headers={
            "X-Seed": str(req.seed),
            "X-Batch-Size": str(image.batch_size),
            "X-Queue-Ms": f"{image.queue_ms:.1f}",
            "X-Inference-Ms": f"{image.inference_ms:.1f}",
        })
