"""`GET /openapi.json`: OpenAPI 3.1 for every route, built from the same field definitions the
validator uses (`schema.FIELDS`, with the running server's limits), so it cannot drift.

Each door module contributes its own paths (`openai.openapi`, `a1111.openapi`, ...); this module
adds `/t2i`, the operations routes and the page, and the shared components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import __version__
from ..encode import MEDIA_TYPES
from ..schema import Limits, request_schema
from . import a1111, openai

PathsFor = Callable[[Limits], dict[str, Any]]

ERROR_SCHEMA = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message", "field"], "properties": {
        "code": {"type": "string"}, "message": {"type": "string"},
        "field": {"type": ["string", "null"]}}}}}
_ERROR = {"$ref": "#/components/schemas/Error"}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": _STATUS[s], "content": {"application/json": {
        "schema": _ERROR}}} for s in statuses}


_STATUS = {400: "malformed JSON", 401: "missing or wrong API key", 404: "no such job",
           413: "body too large (--max-body-bytes; --max-image-bytes when it carries an image)",
           415: "not application/json", 422: "a field missing, unknown or out of range",
           429: "queue full (Retry-After)", 500: "generation failed",
           503: "not ready or draining (Retry-After)", 504: "waited past its timeout"}


def _t2i(limits: Limits) -> dict[str, Any]:
    image = {"description": "the image; headers X-Seed, X-Batch-Size, X-Queue-Ms, "
             "X-Inference-Ms, X-Request-Id",
             "content": {media: {"schema": {"type": "string", "contentMediaType": media}}
                         for media in MEDIA_TYPES.values()}}
    return {"/t2i": {"post": {
        "tags": ["batchserve"], "summary": "Generate one image (from a prompt, or from an "
        "init image: img2img and inpainting)", "operationId": "t2i",
        "security": [{"bearer": []}, {}],
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/T2IRequest"}}}},
        "responses": {"200": image, **_errors(400, 401, 413, 415, 422, 429, 500, 503, 504)},
    }}}


def _jobs(limits: Limits) -> dict[str, Any]:
    body = request_schema(limits)
    body["properties"]["webhook"] = {
        "type": "string", "format": "uri",
        "description": "POSTed the job's view when it ends (hosts in "
        "--webhook-allow-hosts); header X-Batchserve-Event says which moment"}
    body["properties"]["webhook_events"] = {
        "type": "array", "items": {"type": "string", "enum": ["started", "progress",
                                                             "completed"]},
        "uniqueItems": True, "minItems": 1, "default": ["completed"],
        "description": "which moments the webhook hears: started, progress (at most one "
        "every 5 s, with its step), completed (the end, whatever it is)"}
    job = {"description": "the job", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Job"}}}}
    job_id = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    headers = [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}},
               {"name": "Prefer", "in": "header", "schema": {"type": "string"},
                "description": "wait=N: answer when the job ends, within N <= 60 s"}]

    def op(summary: str, op_id: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"tags": ["jobs"], "summary": summary, "operationId": op_id,
                "security": [{"bearer": []}, {}], "responses": responses, **extra}

    return {
        "/v1/jobs": {"post": op(
            "Submit an async job (the /t2i body plus webhook)", "jobs_submit",
            {"202": job, "200": job, **_errors(400, 401, 413, 415, 422, 429, 503)},
            parameters=headers,
            requestBody={"required": True, "content": {"application/json": {"schema": body}}},
        )},
        "/v1/jobs/{job_id}": {
            "get": op("A job's status and result", "jobs_get", {"200": job, **_errors(401, 404)},
                      parameters=job_id),
            "delete": op("Cancel a job (or delete its result)", "jobs_cancel",
                         {"200": job, **_errors(401, 404)}, parameters=job_id),
        },
        "/v1/jobs/{job_id}/image": {"get": op(
            "The image of a succeeded job", "jobs_image",
            {"200": {"description": "the image", "content": {
                media: {"schema": {"type": "string", "contentMediaType": media}}
                for media in MEDIA_TYPES.values()}},
             "302": {"description": "redirect to a presigned URL (--result-redirect)"},
             **_errors(401, 404)},
            parameters=[*job_id, {
                "name": "redirect", "in": "query", "schema": {"type": "boolean", "default": True},
                "description": "false: the bytes even with --result-redirect (a page whose CSP "
                               "or CORS forbids following the 302)"}],
        )},
        "/v1/jobs/{job_id}/events": {"get": op(
            "The job as Server-Sent Events: queued (position), started, progress (step, steps, "
            "fraction, preview), then succeeded, failed or canceled with the job's view",
            "jobs_events",
            {"200": {"description": "an event stream", "content": {"text/event-stream": {
                "schema": {"type": "string"}}}}, **_errors(401, 404)},
            parameters=[*job_id, {
                "name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                "description": "resume after this event (a reconnecting client's last id)"}],
        )},
    }


JOB_SCHEMA = {"type": "object", "required": ["id", "status"], "properties": {
    "id": {"type": "string"},
    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "canceled"]},
    "result": {"type": ["object", "null"]}, "error": {"type": ["object", "null"]},
    "urls": {"type": "object"}, "queue_position": {"type": ["integer", "null"]}}}


def _ops(limits: Limits) -> dict[str, Any]:
    def get(path: str, summary: str, op: str, media: str = "application/json",
            tag: str = "operations") -> dict[str, Any]:
        return {path: {"get": {"tags": [tag], "summary": summary, "operationId": op,
                               "responses": {"200": {"description": "OK",
                                                     "content": {media: {"schema": {}}}}}}}}

    return {
        **get("/healthz", "Liveness", "healthz"),
        **get("/readyz", "200 when loaded, warmed and accepting; else 503", "readyz"),
        **get("/v1/info", "Model, device, tuning, batching, limits, live state", "info"),
        **get("/v1/loras", "LoRA files of --lora-dir a request may name (usable or why not, "
              "resident or not)", "loras"),
        **get("/metrics", "Prometheus metrics", "metrics", "text/plain"),
        **get("/openapi.json", "This document", "openapi"),
        **get("/docs", "This document, rendered", "docs", "text/html", "page"),
        **get("/", "The web page", "page", "text/html", "page"),
    }


def build(limits: Limits, extra: list[PathsFor] | None = None) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for part in (_t2i, _jobs, openai.openapi, a1111.openapi, _ops, *(extra or [])):
        paths.update(part(limits))
    return {
        "openapi": "3.1.0",
        "info": {"title": "batchserve", "version": __version__,
                 "description": "Micro-batching text-to-image server. Every door below "
                 "validates with the same rules and shares the same batches."},
        "paths": paths,
        "components": {
            "schemas": {"T2IRequest": request_schema(limits), "Error": ERROR_SCHEMA,
                        "OpenAIError": openai.ERROR_SCHEMA, "A1111Error": a1111.ERROR_SCHEMA,
                        "Job": JOB_SCHEMA},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "--api-key, when set"},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "A1111 routes: any user name, --api-key as password"},
            },
        },
    }
