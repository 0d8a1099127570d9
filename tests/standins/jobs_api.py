"""An in-memory stand-in of batchserve's jobs API behind `httpx.MockTransport`, for the bots'
in-process tests: the test moves each job (`run`, `progress`, `finish`, `fail`) and scripts
answers (`script`: the next answers of a route), and the client's sleeps wait for the next
change instead of for time (`sleep`)."""

from __future__ import annotations

import asyncio
import io
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from PIL import Image

Handler = Callable[[httpx.Request], httpx.Response]


def png(width: int = 64, height: int = 64) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


class FakeJobsAPI:
    def __init__(self, *, events: bool = False) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[httpx.Request] = []
        self.scripted: dict[str, list[httpx.Response]] = {}
        self.events = events
        self.sleeps: list[float] = []
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._read = asyncio.Event()

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- the test's side ---------------------------------------------------------------------

    def script(self, route: str, *answers: httpx.Response) -> None:
        """The next answers of `route` ("POST /v1/jobs", "GET /v1/jobs/{id}/events", ...)."""
        self.scripted.setdefault(route, []).extend(answers)

    def run(self, job_id: str) -> None:
        self._move(job_id, status="running", queue_position=None)

    def progress(self, job_id: str, step: int, steps: int) -> None:
        self._move(job_id, progress={"step": step, "steps": steps, "fraction": step / steps})

    def finish(self, job_id: str) -> None:
        request = self.jobs[job_id]["request"]
        self._move(job_id, status="succeeded", completed_at="2026-01-01T00:00:02.500Z",
                   progress=None, result={"seed": request["seed"], "width": request["width"],
                                          "height": request["height"], "format": "png"})

    def fail(self, job_id: str, message: str) -> None:
        self._move(job_id, status="failed", error={"code": "generation_failed",
                                                   "message": message})

    async def sleep(self, seconds: float) -> None:
        """The client's sleep: returns at the next change of any job (or script)."""
        self.sleeps.append(seconds)
        await self._changed.wait()
        self._changed.clear()

    async def next_read(self) -> None:
        """Returns once a client has read a job (`GET /v1/jobs/{id}`) after this call."""
        self._read.clear()
        await self._read.wait()

    def calls(self, method: str, path_start: str) -> list[httpx.Request]:
        return [r for r in self.requests
                if r.method == method and r.url.path.startswith(path_start)]

    def _move(self, job_id: str, **changes: Any) -> None:
        if changes.get("status", "queued") != "queued":
            changes["queue_position"] = None
        self.jobs[job_id].update(changes)
        self._changed.set()

    # -- the API -----------------------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        route = f"{request.method} {path}"
        for pattern, answers in self.scripted.items():
            if answers and (route == pattern or (pattern.endswith("*")
                                                 and route.startswith(pattern[:-1]))):
                return answers.pop(0)
        if route == "GET /v1/info":
            return httpx.Response(200, json={"limits": {"max_pixels": 8192, "max_steps": 50}})
        if route == "POST /v1/jobs":
            body = orjson.loads(request.content)
            job_id = f"job_{next(self._ids):022d}"
            self.jobs[job_id] = {
                "id": job_id, "status": "queued", "created_at": "2026-01-01T00:00:00.000Z",
                "started_at": None, "completed_at": None, "queue_position": 0,
                "request": {"seed": 7, **body}, "result": None, "error": None,
            }
            self._changed.set()
            return httpx.Response(202, json={"id": job_id, "status": "queued"})
        parts = path.split("/")  # "", "v1", "jobs", id, [rest]
        job = self.jobs.get(parts[3]) if len(parts) > 3 else None
        if job is None:
            return _error(404, "not_found", "no such job")
        if path.endswith("/events"):
            if not self.events:
                return _error(404, "not_found", "no route")
            after = int(request.headers.get("last-event-id") or 0)
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=_stream(job, after))
        if path.endswith("/image"):
            if job["status"] != "succeeded":
                return _error(409, "job_not_succeeded", f"job is {job['status']}")
            return httpx.Response(200, content=png(job["request"]["width"],
                                                   job["request"]["height"]))
        if request.method == "DELETE":
            if job["status"] in ("queued", "running"):
                self._move(job["id"], status="canceled")
            return httpx.Response(200, json=job)
        self._read.set()
        return httpx.Response(200, json=job)


def _stream(job: dict[str, Any], after: int) -> bytes:
    """The agreed event stream of a job that ends now, from the event after `after` (a
    reconnect's Last-Event-ID)."""
    lines = [
        ("1", "queued", {"id": job["id"], "status": "queued", "position": 0}),
        ("2", "started", {"id": job["id"], "status": "running"}),
        ("3", "progress", {"id": job["id"], "step": 1, "steps": 2, "fraction": 0.5}),
        ("4", job["status"], job),
    ]
    return b"".join(f"id: {i}\nevent: {e}\ndata: {orjson.dumps(d).decode()}\n\n".encode()
                    for i, e, d in lines if int(i) > after)


def _error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers,
                          json={"error": {"code": code, "message": message, "field": None}})


def error(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    """A batchserve error answer (`Retry_After="3"` gives the Retry-After header)."""
    return _error(status, code, message,
                  **{k.replace("_", "-"): v for k, v in headers.items()})
