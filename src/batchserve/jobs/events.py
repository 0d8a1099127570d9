"""One job as a stream of events (`GET /v1/jobs/{id}/events`, Server-Sent Events):

    queued    {"id", "status": "queued", "position"}        again when the position changes
    started   {"id", "status": "running"}
    progress  {"id", "status": "running", "step", "steps", "fraction"[, "preview"]}
    succeeded | failed | canceled    the job's view, as `GET /v1/jobs/{id}` shows it; the end

Events are derived from the job's record (the backend's, so they hold on `--role api` with the
workers elsewhere) and from the progress board, not from a log: a reconnecting client sends the
last id it saw (`Last-Event-ID`) and gets what happened after it, since ids grow with the job
(`phase * 1_000_000 + n`: queued updates, started, progress by step, the end). Progress it missed
is skipped (the newest step is sent); the terminal event is never skipped, as it comes from the
record. `preview` is a `data:image/jpeg;base64,...` URL when a new one was made (`--preview-every`).
A client that reads slowly holds nothing but its own connection: the board keeps only the newest
progress per job.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import orjson

from ..errors import BackendDown, NotFound
from ..progress import Progress, ProgressBoard
from .record import Status
from .service import JobService

QUEUED, STARTED, PROGRESS, ENDED = 1_000_000, 2_000_000, 3_000_000, 4_000_000
PING_S = 15  # comment lines keep idle connections (and proxies) open
POLL_S = 1.0  # the record is read again at least this often (queue position, remote state)


class JobEvents:
    def __init__(self, jobs: JobService, board: ProgressBoard, job_id: str, base_url: str,
                 last_id: int = 0, *, poll_s: float = POLL_S) -> None:
        self.jobs, self.board, self.job_id, self.base_url = jobs, board, job_id, base_url
        self.sent = max(0, last_id)
        self.poll_s = poll_s
        self._queued = self.sent - QUEUED if QUEUED <= self.sent < STARTED else 0
        self._position: int | None = None
        self._preview: bytes | None = None

    async def events(self) -> AsyncIterator[dict[str, str]]:
        with self.board.listen(self.job_id):
            while True:
                try:
                    record = await self.jobs.get(self.job_id)
                except NotFound:
                    return  # expired or deleted meanwhile: nothing more will happen
                except BackendDown:
                    await asyncio.sleep(self.poll_s)  # the backend is back soon, or not
                    continue
                if record.status.terminal:
                    if self.sent < ENDED:
                        yield self._event(ENDED, str(record.status),
                                          self.jobs.view(record, self.base_url))
                    return
                if record.status is Status.QUEUED:
                    position = await self.jobs.position(record)
                    if self.sent < STARTED and (self._queued == 0 or position != self._position):
                        self._queued += 1
                        self._position = position
                        yield self._event(QUEUED + self._queued, "queued", {
                            "id": self.job_id, "status": "queued", "position": position})
                else:
                    if self.sent < STARTED:
                        yield self._event(STARTED, "started",
                                          {"id": self.job_id, "status": "running"})
                    progress = await self._progress()
                    if progress is not None and PROGRESS + progress.step > self.sent:
                        yield self._event(PROGRESS + progress.step, "progress",
                                          self._progress_data(progress))
                await self._changed()

    async def _progress(self) -> Progress | None:
        local = self.board.get(self.job_id)
        if local is not None:
            return local
        return await self.jobs.queue.progress(self.job_id)  # a worker elsewhere mirrors it

    def _progress_data(self, progress: Progress) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.job_id, "status": "running", **progress.to_dict()}
        if progress.preview is not None and progress.preview != self._preview:
            self._preview = progress.preview
            data["preview"] = ("data:image/jpeg;base64,"
                               + base64.b64encode(progress.preview).decode("ascii"))
        return data

    async def _changed(self) -> None:
        """Until the job ends here, its progress moves, or `poll_s` passes."""
        ended = asyncio.ensure_future(self.jobs.wait(self.job_id, self.poll_s))
        moved = asyncio.ensure_future(self.board.changed(self.job_id, self.poll_s))
        try:
            await asyncio.wait((ended, moved), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ended, moved):
                task.cancel()
            await asyncio.gather(ended, moved, return_exceptions=True)

    def _event(self, event_id: int, name: str, data: dict[str, Any]) -> dict[str, str]:
        self.sent = event_id
        return {"id": str(event_id), "event": name, "data": orjson.dumps(data).decode()}
