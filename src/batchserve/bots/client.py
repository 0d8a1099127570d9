"""The jobs-API client both bots share: submit, follow a job to its end, fetch its image,
cancel it, read `/v1/info`. Any batchserve base URL, with an API key (Bearer).

Guarantees the bots rely on:
- every failure is a `ServerError` whose `sentence` a person can read (never a traceback, never
  the API key or a URL with secrets);
- a busy server's 429/503 is retried, waiting its `Retry-After`, until `retry_budget_s` is
  spent; `submit` sends one `Idempotency-Key` for all its tries, so a retry never makes two jobs;
- `follow` yields the job as it moves and ends with its terminal view. It reads the server's
  event stream (`GET /v1/jobs/{id}/events`, Server-Sent Events) when the server offers one and
  otherwise polls `GET /v1/jobs/{id}` every `poll_interval_s`; a server that cannot be reached
  meanwhile yields a `lost` view and is tried again (the caller bounds the whole wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
from httpx_sse import ServerSentEvent, aconnect_sse

from .. import __version__

TERMINAL = frozenset({"succeeded", "failed", "canceled"})
DEFAULT_RETRY_AFTER_S = 2.0
MAX_RETRY_AFTER_S = 60.0  # one wait, whatever the server says (the budget bounds them all)

Sleep = Callable[[float], Awaitable[None]]
OnWait = Callable[[float], Awaitable[None]]


class ServerError(Exception):
    """The server refused, failed or could not be reached. `sentence` is what the bots show."""

    def __init__(self, sentence: str, *, status: int | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(sentence)
        self.sentence = sentence
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


UNREACHABLE = "The image server cannot be reached right now. Please try again in a minute."


@dataclass(frozen=True, slots=True)
class JobView:
    """One job as the bots see it, from a job record or an event."""

    id: str
    status: str
    position: int | None = None
    step: int | None = None
    steps: int | None = None
    fraction: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    seconds: float | None = None
    """Queue plus generation time of a succeeded job."""
    error: str | None = None
    """A failed job's sentence."""
    lost: bool = False
    """The server could not be reached just now (the job goes on; the client tries again)."""

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> JobView:
        """From the `GET /v1/jobs/{id}` body (also a terminal event's data)."""
        progress = data.get("progress") or {}
        result = data.get("result") or {}
        error = data.get("error") or {}
        seconds = None
        if result and (started := _time(data.get("created_at"))) is not None and (
            ended := _time(data.get("completed_at"))
        ) is not None:
            seconds = max(0.0, ended - started)
        return cls(
            id=str(data["id"]), status=str(data["status"]),
            position=data.get("queue_position"),
            step=progress.get("step"), steps=progress.get("steps"),
            fraction=progress.get("fraction"),
            seed=result.get("seed"), width=result.get("width"), height=result.get("height"),
            seconds=seconds,
            error=_failure_sentence(error.get("code"), error.get("message")) if error else None,
        )


class JobsClient:
    """A client of one batchserve base URL (the module docstring says what it guarantees)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        retry_budget_s: float = 120.0,
        poll_interval_s: float = 1.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        headers = {"User-Agent": f"batchserve-bot/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=headers, transport=transport,
            timeout=httpx.Timeout(30.0, connect=5.0),
        )
        self.retry_budget_s = retry_budget_s
        self.poll_interval_s = poll_interval_s
        self._sleep = sleep
        self._clock = clock
        self.events_offered: bool | None = None
        """None until a job was followed; False once the server answered 404 to the event
        stream (then polled until `forget_capabilities`, called when `/v1/info` is re-read)."""

    async def aclose(self) -> None:
        await self._http.aclose()

    def forget_capabilities(self) -> None:
        self.events_offered = None

    async def info(self) -> dict[str, Any]:
        response = await self._request("GET", "/v1/info")
        data: dict[str, Any] = response.json()
        return data

    async def submit(self, body: Mapping[str, Any], *, on_wait: OnWait | None = None) -> JobView:
        """`POST /v1/jobs`: the queued job. A busy server is retried within the budget, each
        wait announced through `on_wait(seconds)` first."""
        key = {"Idempotency-Key": f"bot-{uuid.uuid4().hex}"}
        response = await self._request("POST", "/v1/jobs", json=dict(body), headers=key,
                                       retry=True, on_wait=on_wait)
        return JobView.from_record(response.json())

    async def get(self, job_id: str) -> JobView:
        return JobView.from_record((await self._request("GET", f"/v1/jobs/{job_id}")).json())

    async def cancel(self, job_id: str) -> JobView:
        """`DELETE /v1/jobs/{id}`: the job as it ended (`canceled`, or its status if it ended
        first)."""
        response = await self._request("DELETE", f"/v1/jobs/{job_id}", retry=True)
        return JobView.from_record(response.json())

    async def image(self, job_id: str) -> bytes:
        """The image of a succeeded job (following a redirect to a presigned URL: httpx drops
        the Authorization header when it leaves the server's host)."""
        response = await self._request("GET", f"/v1/jobs/{job_id}/image", retry=True,
                                       follow_redirects=True)
        return response.content

    async def follow(self, job_id: str) -> AsyncIterator[JobView]:
        """The job's views as it moves, ending with its terminal view (module docstring)."""
        cursor = _Cursor()
        while True:
            if self.events_offered is not False:
                try:
                    async for view in self._events(job_id, cursor):
                        yield view
                        if view.terminal:
                            return
                except httpx.TransportError:
                    pass  # the stream broke: read the job once, then reconnect
            try:
                view = await self.get(job_id)
            except ServerError as exc:
                if exc.status is not None and exc.status < 500 and exc.status != 429:
                    raise  # gone (404), or the key was refused: waiting will not help
                view = JobView(job_id, cursor.status, lost=True)
            cursor.status = view.status
            yield view
            if view.terminal:
                return
            await self._sleep(self.poll_interval_s)

    async def _events(self, job_id: str, cursor: _Cursor) -> AsyncIterator[JobView]:
        headers = {"Last-Event-ID": cursor.last_id} if cursor.last_id else {}
        timeout = httpx.Timeout(30.0, connect=5.0, read=90.0)  # servers send keep-alives
        async with aconnect_sse(self._http, "GET", f"/v1/jobs/{job_id}/events",
                                headers=headers, timeout=timeout) as source:
            if source.response.status_code == 404:
                self.events_offered = False  # no such route (an older server): poll
                return
            if source.response.status_code != 200:
                return  # the job itself is read next, which says what is wrong
            self.events_offered = True
            async for event in source.aiter_sse():
                if event.id:
                    cursor.last_id = event.id
                view = _event_view(job_id, event)
                if view is not None:
                    cursor.status = view.status
                    yield view
                    if view.terminal:
                        return

    async def _request(
        self, method: str, path: str, *, retry: bool = False, on_wait: OnWait | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        deadline = self._clock() + self.retry_budget_s
        resent = False
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.ConnectError:
                raise ServerError(UNREACHABLE) from None
            except httpx.TransportError:
                # Sent but no answer (a read timeout, a dropped connection): one more try is
                # safe, since every call here is idempotent (`submit` by its Idempotency-Key).
                if resent:
                    raise ServerError(UNREACHABLE) from None
                resent = True
                continue
            if response.is_success or (response.is_redirect and not kwargs.get(
                    "follow_redirects")):
                return response
            error = error_from(response)
            wait = error.retry_after_s
            busy = response.status_code in (429, 503)
            if not (retry and busy):
                raise error
            wait = min(MAX_RETRY_AFTER_S, wait if wait is not None else DEFAULT_RETRY_AFTER_S)
            if self._clock() + wait > deadline:
                raise error
            if on_wait is not None:
                await on_wait(wait)
            await self._sleep(wait)


@dataclass(slots=True)
class _Cursor:
    """What `follow` remembers across reconnects."""

    last_id: str | None = None
    status: str = "queued"


def _event_view(job_id: str, event: ServerSentEvent) -> JobView | None:
    """One event of the agreed stream as a view; None for an event this client does not know
    (a newer server may add some)."""
    try:
        data = orjson.loads(event.data) if event.data else {}
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if event.event in TERMINAL:
        return JobView.from_record({"id": job_id, **data, "status": event.event})
    if event.event == "queued":
        return JobView(job_id, "queued", position=data.get("position"))
    if event.event == "started":
        return JobView(job_id, "running")
    if event.event == "progress":
        return JobView(job_id, "running", step=data.get("step"), steps=data.get("steps"),
                       fraction=data.get("fraction"))
    return None


def error_from(response: httpx.Response) -> ServerError:
    """The server's error answer (`{"error": {"code", "message", "field"}}`) as a sentence."""
    code = message = None
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    status = response.status_code
    return ServerError(_sentence(status, code, message), status=status, code=code,
                       retry_after_s=retry_after(response.headers.get("retry-after")))


def _sentence(status: int, code: str | None, message: str | None) -> str:
    if status in (400, 413, 422) and message:
        return f"The image server did not accept this request: {_period(message)}"
    if status == 401:
        return ("The image server refused this bot's API key. The bot's operator must set "
                "--server-api-key.")
    if status == 404:
        return "That image is no longer on the server (it expired or was deleted)."
    if status == 410:
        return "That image was deleted from the server."
    if status == 429:
        return "The image server's queue is full. Please try again in a minute."
    if status == 503:
        return "The image server is busy or restarting. Please try again in a minute."
    if status == 504 and message:
        return f"The image server could not finish in time: {_period(message)}"
    return "The image server had a problem with this request. Please try again."


def _failure_sentence(code: str | None, message: str | None) -> str:
    if code == "worker_lost":
        return "The image server lost this job (its worker stopped). Please try again."
    if message:
        return f"The image server could not make this image: {_period(message)}"
    return "The image server could not make this image. Please try again."


def _period(text: str) -> str:
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date (RFC 9110); None if absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
