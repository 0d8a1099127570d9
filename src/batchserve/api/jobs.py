"""The async jobs door: `POST /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/jobs/{id}/image`,
`GET /v1/jobs/{id}/events` (Server-Sent Events, `jobs.events`), `DELETE /v1/jobs/{id}`. A
translation onto `service.jobs` (`jobs.service.JobService`): the body is the `/t2i` body (same
`schema` validation, same errors) plus an optional `webhook`."""

from __future__ import annotations

import contextlib
import hashlib
import re
from functools import partial
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..errors import BackendDown, BatchServeError, JobsQueueFull, ValidationError
from ..jobs.events import PING_S, JobEvents
from ..jobs.service import PREFER_WAIT_MAX_S
from ..jobs.webhooks import EVENTS as WEBHOOK_EVENTS
from ..jobs.webhooks import check_url
from ..schema import IMAGE_FIELDS, decode, has_images, validate
from .common import Gateway, JSONResponse

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_PREFER_WAIT = re.compile(r"(?:^|[,;])\s*wait\s*=\s*\"?(\d{1,6})\"?\s*(?=$|[,;])", re.IGNORECASE)


class JobsDoor:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = gateway.service
        self.jobs = gateway.service.jobs

    async def submit(self, request: Request, record: dict[str, Any]) -> Response:
        gateway, service = self.gateway, self.service
        gateway.authorize(request)
        service.check_accepting_jobs()
        body = await gateway.read_json(request, images=IMAGE_FIELDS)
        try:
            data = decode(body)
            webhook = data.pop("webhook", None)
            events = _webhook_events(data.pop("webhook_events", None), webhook)
            if webhook is not None:
                webhook = check_url(webhook, service.settings.webhook_hosts())
            key = _idempotency_key(request)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        req = await gateway.validated(partial(validate, data, service.limits),
                                      images=has_images(data))
        record.update(key=req.key_label, seed=req.seed, priority=req.priority)
        try:
            await service.admit_tenant(1, req.priority)
        except BatchServeError as exc:
            raise gateway.rejecting(exc) from None
        if service.settings.log_prompts:
            record.update(prompt=req.prompt, negative_prompt=req.negative_prompt)
        base = str(request.base_url)
        try:
            job = await self.jobs.submit(
                req, req.format or "png", owner=self._owner(request), idempotency_key=key,
                webhook=webhook, base_url=base, webhook_events=events,
            )
        except JobsQueueFull as exc:
            raise gateway.rejecting(exc) from None
        record["job"] = job.id
        wait_s = _prefer_wait(request.headers.get("prefer"))
        headers = {"Location": self.jobs.urls(job.id, base)["get"]}
        if wait_s is not None:
            headers["Preference-Applied"] = f"wait={wait_s}"
            # The job is stored: a backend failure now answers 202, never a 503 (which promises
            # nothing was stored and invites a resubmit).
            with contextlib.suppress(BackendDown):
                job = await self.jobs.wait(job.id, wait_s)
            if job.status.terminal:
                return JSONResponse(self.jobs.view(job, base), headers=headers)
        return JSONResponse(self.jobs.summary(job, base), status_code=202, headers=headers)

    async def get(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request)
        job = await self.jobs.get(_job_id(request, record))
        position = await self.jobs.position(job)
        return JSONResponse(self.jobs.view(job, str(request.base_url), position))

    async def events(self, request: Request, record: dict[str, Any]) -> Response:
        """`GET /v1/jobs/{id}/events`: the job as Server-Sent Events (`JobEvents`), resumed
        after the event a reconnecting client names in `Last-Event-ID`."""
        self.gateway.authorize(request)
        job_id = _job_id(request, record)
        await self.jobs.get(job_id)  # 404 now, in the door's shape, rather than in the stream
        try:
            last = int(request.headers.get("last-event-id") or 0)
        except ValueError:
            last = 0
        stream = JobEvents(self.jobs, self.service.progress, job_id, str(request.base_url),
                           last)
        return EventSourceResponse(stream.events(), ping=PING_S,
                                   headers={"Cache-Control": "no-store"})

    async def image(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request)
        job_id = _job_id(request, record)
        # `?redirect=false` asks for the bytes even with --result-redirect: the page's fetch may
        # not follow a 302 to the store's origin (its CSP's connect-src is 'self', and the
        # bucket would need CORS), so the page always asks this way.
        wanted = request.query_params.get("redirect", "true").lower() not in ("false", "0")
        url = await self.jobs.image_redirect(job_id) if wanted else None
        if url is not None:
            return RedirectResponse(url, status_code=302)
        data, media_type = await self.jobs.image_file(job_id)
        return Response(data, media_type=media_type)

    async def cancel(self, request: Request, record: dict[str, Any]) -> Response:
        self.gateway.authorize(request)
        job = await self.jobs.cancel(_job_id(request, record))
        return JSONResponse(self.jobs.view(job, str(request.base_url)))

    def _owner(self, request: Request) -> str:
        """Who submitted: a digest of the API key used ("" without auth). Scopes idempotency
        keys; the key itself is never stored."""
        if self.service.tenants is None:
            return ""
        given = request.headers.get("authorization", "").partition(" ")[2].strip()
        return hashlib.sha256(given.encode()).hexdigest()[:16]


def _webhook_events(value: Any, webhook: Any) -> tuple[str, ...]:
    """`webhook_events`: which of the job's moments its webhook hears (Replicate's filter)."""
    if value is None:
        return ("completed",)
    if webhook is None:
        raise ValidationError("webhook_events needs a webhook", field="webhook_events")
    if not isinstance(value, list) or not value or not all(
        isinstance(e, str) and e in WEBHOOK_EVENTS for e in value
    ) or len(set(value)) != len(value):
        raise ValidationError(f"webhook_events must be a non-empty list of distinct events "
                              f"among {', '.join(WEBHOOK_EVENTS)}", field="webhook_events")
    return tuple(value)


def _job_id(request: Request, record: dict[str, Any]) -> str:
    job_id = str(request.path_params["job_id"])
    record["job"] = job_id[:64]
    return job_id


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationError(
            "Idempotency-Key must be 1..255 visible ASCII characters", field="Idempotency-Key"
        )
    return key


def _prefer_wait(header: str | None) -> int | None:
    """`Prefer: wait=N` (RFC 7240) as seconds, at most 60; None when absent or unreadable
    (a preference the server cannot honour is ignored, not refused)."""
    match = _PREFER_WAIT.search(header or "")
    if match is None:
        return None
    return min(int(match.group(1)), PREFER_WAIT_MAX_S)
