"""OpenAI's images API: `POST /v1/images/generations`, `POST /v1/images/edits` and
`GET /v1/models`.

A translation: `size` "WxH" becomes width/height, `n` becomes n batch items with seeds seed,
seed+1, ..., and the extras keep our names. Errors use OpenAI's shape with our status codes.

Edits are multipart, as OpenAI's: `image` (one file) is the init image, and an optional `mask`
marks the edit with its fully transparent pixels (an image with transparency and no mask: its
own transparent pixels), which becomes our white-is-repainted mask. Without `size` (or with
"auto") the image keeps its own size, rounded down to the multiple the model takes
(`Limits.size_multiple`: 8, FLUX 16).
"""

from __future__ import annotations

import base64
import re
import time
from functools import partial
from typing import Any

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response

from ..errors import BatchServeError, ValidationError
from ..images import MaskRule
from ..schema import FIELDS, FORMATS, Limits, T2IRequest, decode, repeat, validate
from .common import Gateway, JSONResponse, error_headers
from .uploads import form_bytes

MAX_N = 10
RESPONSE_FORMATS = ("b64_json", "url")
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
# Our fields a client may send under the same name (extras beyond OpenAI's own).
EXTRAS = ("negative_prompt", "num_inference_steps", "guidance_scale", "seed", "sampler",
          "refiner_switch", "loras")
IGNORED = ("model", "quality", "style", "user")  # accepted, change nothing here
ALLOWED = ("prompt", "n", "size", "response_format", *IGNORED, *EXTRAS)
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}
# Edits: OpenAI's fields that change nothing here, and ours beyond the generation extras.
EDIT_IGNORED = (*IGNORED, "input_fidelity", "safety_identifier", "output_compression",
                "partial_images", "complexity")
EDIT_EXTRAS = (*(name for name in EXTRAS if name != "refiner_switch"), "strength", "mask_blur")
EDIT_ALLOWED = ("image", "mask", "prompt", "n", "size", "response_format", "output_format",
                "background", "stream", *EDIT_IGNORED, *EDIT_EXTRAS)
_EDIT_ALIASES = {"width": "size", "height": "size", "inference_steps": "num_inference_steps",
                 "init_image": "image", "mask_image": "mask"}
_INTEGER = re.compile(r"[+-]?\d{1,20}")



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
    n, fmt = _n(data), _response_format(data)
    ours = {k: v for k, v in data.items() if k in EXTRAS or k == "prompt"}
    if data.get("size") is not None:
        ours["width"], ours["height"] = _size(data["size"], limits)
    # Width and height errors name `size`, the field this client sent.
    req = validate(ours, limits, {"width": "size", "height": "size",
                                  "inference_steps": "num_inference_steps"}, count=n)
    return repeat(req, n), fmt


def _n(data: dict[str, Any]) -> int:
    n = data.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValidationError(f"n must be an integer between 1 and {MAX_N}", field="n")
    return n


def _response_format(data: dict[str, Any]) -> str:
    fmt = data.get("response_format") or "b64_json"
    if fmt not in RESPONSE_FORMATS:
        raise ValidationError(
            f"response_format must be one of {', '.join(RESPONSE_FORMATS)}", field="response_format"
        )
    return str(fmt)


async def edit_fields(form: FormData) -> dict[str, Any]:
    """A multipart edits body as a dict: text fields as sent (numbers parsed where ours are
    numbers), `image` (also `image[]`, as the official client names a list) and `mask` as
    bytes. A field sent twice, or a second image, is refused."""
    out: dict[str, Any] = {}
    for name, value in form.multi_items():
        key = "image" if name == "image[]" else name
        if key in out:
            if key == "image":
                raise ValidationError("send one image; several are not served here",
                                      field="image")
            raise ValidationError(f"{name} is given more than once", field=name)
        if key in ("image", "mask"):
            out[key] = await form_bytes(value)
        elif isinstance(value, UploadFile):
            raise ValidationError(f"{name} must be a text field, not a file", field=name)
        else:
            out[key] = _form_value(key, value)
    return out


def _form_value(name: str, text: str) -> Any:
    """A text field as the JSON value it stands for, where our field is a number (or, for
    `loras`, the JSON list as text: a form has no lists of objects)."""
    kind = "integer" if name == "n" else FIELDS[name].type if name in FIELDS else "string"
    if kind == "loras":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            raise ValidationError("loras must be a JSON list of {name, scale} objects",
                                  field="loras") from None
    try:
        if kind == "integer" and _INTEGER.fullmatch(text.strip()):
            return int(text)
        if kind == "number":
            return float(text)
    except ValueError:
        pass
    return text


def translate_edit(data: dict[str, Any], limits: Limits) -> tuple[list[T2IRequest], str, str]:
    """An edits body (`edit_fields`) to our requests (one per image), the response format and
    the image format. Decodes the images: call it off the event loop."""
    unknown = sorted(set(data) - set(EDIT_ALLOWED))
    if unknown:
        raise ValidationError(f"unknown field {unknown[0]!r}; allowed fields: "
                              f"{', '.join(EDIT_ALLOWED)}", field=unknown[0])
    if "image" not in data:
        raise ValidationError("image is required (the image to edit, as a file)", field="image")
    if str(data.get("stream", "false")).lower() not in ("false", "0", ""):
        raise ValidationError("stream is not served here; send stream=false", field="stream")
    if data.get("background", "auto") not in ("auto", "opaque"):
        raise ValidationError("background must be auto or opaque (no transparent output here)",
                              field="background")
    image_format = data.get("output_format") or "png"
    if image_format not in FORMATS:
        raise ValidationError(f"output_format must be one of {', '.join(FORMATS)}",
                              field="output_format")
    n, fmt = _n(data), _response_format(data)
    ours = {k: v for k, v in data.items() if k in EDIT_EXTRAS or k == "prompt"}
    ours["init_image"] = data["image"]
    if data.get("mask") is not None:
        ours["mask_image"] = data["mask"]
    if data.get("size") not in (None, "", "auto"):  # else the image's own size
        ours["width"], ours["height"] = _size(data["size"], limits)
    req = validate(ours, limits, _EDIT_ALIASES, count=n, masks=MaskRule.TRANSPARENT)
    return repeat(req, n), fmt, image_format


def _size(value: Any, limits: Limits) -> tuple[int, int]:
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValidationError('size must be "WIDTHxHEIGHT", e.g. "{}x{}"'.format(
            *limits.default_size), field="size")
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
        return await self._answer(request, record, reqs, response_format, "png")

    async def edits(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request)
        gateway.check_admitting()
        form = await gateway.read_form(request)
        try:
            data = await edit_fields(form)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        finally:
            await form.close()
        reqs, response_format, image_format = await gateway.validated(
            partial(translate_edit, data, service.limits), images=True)
        return await self._answer(request, record, reqs, response_format, image_format)

    async def _answer(self, request: Request, record: dict[str, Any], reqs: list[T2IRequest],
                      response_format: str, image_format: str) -> Response:
        created = int(time.time())
        if response_format == "url":
            urls = await self._via_jobs(request, reqs, record, image_format)
            return JSONResponse({"created": created, "data": [
                {"url": url, "seed": req.seed} for url, req in zip(urls, reqs, strict=True)]})
        images = await self.gateway.generate(request, reqs, image_format, record)
        data = [{"b64_json": base64.b64encode(g.content).decode(), "seed": g.request.seed}
                for g in images]
        return JSONResponse({"created": created, "data": data}, headers={
            "X-Seed": str(reqs[0].seed),
            "X-Batch-Size": str(max(g.batch_size for g in images)),
        })

    async def _via_jobs(
        self, request: Request, reqs: list[T2IRequest], record: dict[str, Any], fmt: str
    ) -> list[str]:
        """`response_format: "url"`: each image becomes a job; the answer, once all have
        succeeded, holds their image URLs (`GET /v1/jobs/{id}/image`, kept --job-ttl-s)."""
        record.update(key=reqs[0].key_label, seed=reqs[0].seed, images=len(reqs))
        ended = await self.gateway.run_jobs(request, reqs, fmt, record)
        if (result := ended[0].result) is not None:
            record.update(batch_size=result.batch_size, queue_ms=result.queue_ms,
                          inference_ms=result.inference_ms)
        base = str(request.base_url)
        return [self.service.jobs.urls(job.id, base)["image"] for job in ended]

    async def models(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request)
        settings = self.service.settings
        served = [settings.model] + ([settings.refiner] if settings.refiner else [])
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "batchserve"}
            for name in served
        ]})


def openapi(limits: Limits) -> dict[str, Any]:
    """This door's paths, its body built from the shared field definitions."""
    props: dict[str, Any] = {
        "prompt": FIELDS["prompt"].json_schema(limits),
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_N, "default": 1,
              "description": "images, run as batch items with seeds seed, seed+1, ..."},
        "size": {"type": "string", "pattern": r"^\d+x\d+$",
                 "default": "{}x{}".format(*limits.default_size),
                 "description": f"WIDTHxHEIGHT, each a multiple of {limits.size_multiple}; "
                 "each side: " + FIELDS["width"].json_schema(limits)["description"]},
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS),
                            "default": "b64_json",
                            "description": "url: each image's jobs API URL"},
        **{name: {"type": ["string", "null"], "description": "accepted and ignored"}
           for name in IGNORED},
        **{name: FIELDS[name].json_schema(limits) for name in EXTRAS},
    }
    error = {"$ref": "#/components/schemas/OpenAIError"}
    answer = {
        "200": {"description": "the images", "content": {"application/json": {"schema": {
            "type": "object", "properties": {
                "created": {"type": "integer"},
                "data": {"type": "array", "items": {"type": "object", "properties": {
                    "b64_json": {"type": "string"}, "url": {"type": "string"},
                    "seed": {"type": "integer"}}}}}}}}},
        "default": {"description": "an error in OpenAI's shape",
                    "content": {"application/json": {"schema": error}}},
    }
    edit = {
        "image": {"type": "string", "format": "binary", "description": "the image to edit "
                  "(init image): PNG, JPEG or WebP, at most --max-input-pixels; also image[]"},
        "mask": {"type": "string", "format": "binary", "description": "its fully transparent "
                 "pixels mark the edit; the image's size. Without it, the image's own "
                 "transparent pixels do (if any), else the whole image is edited (img2img)"},
        "prompt": props["prompt"], "n": props["n"],
        "size": {**props["size"], "pattern": r"^(\d+x\d+|auto)$", "default": "auto",
                 "description": "WIDTHxHEIGHT (the image "
                 "is stretched to it) or auto: the image's own size, rounded down to a "
                 f"multiple of {limits.size_multiple}"},
        "response_format": props["response_format"],
        "output_format": {"type": "string", "enum": list(FORMATS), "default": "png"},
        "background": {"type": "string", "enum": ["auto", "opaque"], "default": "auto"},
        "stream": {"type": "boolean", "const": False},
        **{name: {"type": "string", "description": "accepted and ignored"}
           for name in EDIT_IGNORED},
        **{name: FIELDS[name].json_schema(limits) for name in EDIT_EXTRAS},
    }
    return {"/v1/images/edits": {"post": {
        "tags": ["OpenAI"], "summary": "Edit an image: img2img and inpainting (OpenAI images "
        "API, multipart)", "operationId": "openai_images_edits", "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["image", "prompt"], "additionalProperties": False,
            "properties": edit}}}},
        "responses": answer}},
        "/v1/images/generations": {"post": {
        "tags": ["OpenAI"], "summary": "Generate images (OpenAI images API)",
        "operationId": "openai_images_generations", "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["prompt"], "additionalProperties": False,
            "properties": props}}}},
        "responses": answer}},
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
