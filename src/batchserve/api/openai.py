"""OpenAI's images API: `POST /v1/images/generations` and `GET /v1/models`.

A translation: `size` "WxH" becomes width/height, `n` becomes n batch items with seeds seed,
seed+1, ..., and the extras keep our names. Errors use OpenAI's shape with our status codes.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from ..errors import BatchServeError, ValidationError
from ..schema import FIELDS, Limits, T2IRequest, decode, repeat, validate
from .common import Gateway, JSONResponse, error_headers

MAX_N = 10
RESPONSE_FORMATS = ("b64_json", "url")
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
# Our fields a client may send under the same name (extras beyond OpenAI's own).
EXTRAS = ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "sampler")
IGNORED = ("model", "quality", "style", "user")  # accepted, change nothing here
ALLOWED = ("prompt", "n", "size", "response_format", *IGNORED, *EXTRAS)
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}



def render_error(exc: BatchServeError) -> Response:
    """OpenAI's error shape, with the status code batchserve uses for the same error."""
    kind = _TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    body = {"error": {"message": exc.message, "type": kind, "param": exc.field, "code": exc.code}}
    return JSONResponse(body, status_code=exc.status, headers=error_headers(exc))


def translate(data: dict[str, Any], limits: Limits) -> tuple[list[T2IRequest], str]:
    """An OpenAI body to our requests (one per image) and the response format."""
    unknown = sorted(set(data) - set(ALLOWED))
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r}; allowed fields: {', '.join(ALLOWED)}", field=unknown[0]
        )
    for name in IGNORED:
        if name in data and not isinstance(data[name], str | None):
            raise ValidationError(f"{name} must be a string", field=name)
    n = data.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValidationError(f"n must be an integer between 1 and {MAX_N}", field="n")
    fmt = data.get("response_format") or "b64_json"
    if fmt not in RESPONSE_FORMATS:
        raise ValidationError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", field="response_format"
        )
    ours = {k: v for k, v in data.items() if k in EXTRAS or k == "prompt"}
    if data.get("size") is not None:
        ours["width"], ours["height"] = _size(data["size"])
    # Width and height errors name `size`, the field this client sent.
    req = validate(ours, limits, {"width": "size", "height": "size",
                                  "inference_steps": "num_inference_steps"}, count=n)
    return repeat(req, n), fmt


def _size(value: Any) -> tuple[int, int]:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValidationError('size must be "WIDTHxHEIGHT", e.g. "512x512"', field="size")
    return int(match[1]), int(match[2])


class OpenAIDoor:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = gateway.service

    async def generations(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request)
        gateway.check_admitting()
        body = await gateway.read_json(request)
        try:
            reqs, response_format = translate(decode(body), service.limits)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        created = int(time.time())
        if response_format == "url":
            urls = await self._via_jobs(request, reqs, record)
            return JSONResponse({"created": created, "data": [
                {"url": url, "seed": req.seed} for url, req in zip(urls, reqs, strict=True)]})
        images = await gateway.generate(request, reqs, "png", record)
        data = [{"b64_json": base64.b64encode(g.content).decode(), "seed": g.request.seed}
                for g in images]
        return JSONResponse({"created": created, "data": data}, headers={
            "X-Seed": str(reqs[0].seed),
            "X-Batch-Size": str(max(g.batch_size for g in images)),
        })

    async def _via_jobs(
        self, request: Request, reqs: list[T2IRequest], record: dict[str, Any]
    ) -> list[str]:
        """`response_format: "url"`: each image becomes a job; the answer, once all have
        succeeded, holds their image URLs (`GET /v1/jobs/{id}/image`, kept --job-ttl-s)."""
        record.update(key=reqs[0].key_label, seed=reqs[0].seed, images=len(reqs))
        ended = await self.gateway.run_jobs(request, reqs, "png", record)
        if (result := ended[0].result) is not None:
            record.update(batch_size=result.batch_size, queue_ms=result.queue_ms,
                          inference_ms=result.inference_ms)
        base = str(request.base_url)
        return [self.service.jobs.urls(job.id, base)["image"] for job in ended]

    async def models(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.service.settings.model, "object": "model", "created": 0,
            "owned_by": "batchserve",
        }]})


def openapi(limits: Limits) -> dict[str, Any]:
    """This door's paths, its body built from the shared field definitions."""
    props: dict[str, Any] = {
        "prompt": FIELDS["prompt"].json_schema(limits),
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1,
              "description": "images, run as batch items with seeds seed, seed+1, ..."},
        "size": {"type": "string", "pattern": r"^\d+x\d+$", "default": "512x512",
                 "description": "WIDTHxHEIGHT; each side: "
                 + FIELDS["width"].json_schema(limits)["description"]},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS),
                            "default": "b64_json",
                            "description": "url: each image's jobs API URL"},
        **{name: {"type": ["string", "null"], "description": "accepted and ignored"}
           for name in IGNORED},
        **{name: FIELDS[name].json_schema(limits) for name in EXTRAS},
    }
    error = {"$ref": "#/components/schemas/OpenAIError"}
    return {"/v1/images/generations": {"post": {
        "tags": ["OpenAI"], "summary": "Generate images (OpenAI images API)",
        "operationId": "openai_images_generations", "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["prompt"], "additionalProperties": False,
            "properties": props}}}},
        "responses": {
            "200": {"description": "the images", "content": {"application/json": {"schema": {
                "type": "object", "properties": {
                    "created": {"type": "integer"},
                    "data": {"type": "array", "items": {"type": "object", "properties": {
                        "b64_json": {"type": "string"}, "url": {"type": "string"},
                        "seed": {"type": "integer"}}}}}}}}},
            "default": {"description": "an error in OpenAI's shape",
                        "content": {"application/json": {"schema": error}}},
        }}},
        "/v1/models": {"get": {
            "tags": ["OpenAI"], "summary": "The served model", "operationId": "openai_models",
            "security": [{"bearer": []}, {}],
            "responses": {"200": {"description": "one model",
                                  "content": {"application/json": {"schema": {
                                      "type": "object"}}}}}}},
    }


ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}}
