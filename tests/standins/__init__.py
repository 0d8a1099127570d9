"""Local stand-ins of the chat services' HTTP APIs (Telegram's Bot API, Slack's Web API) for
the bots' tests: each serves exactly the methods the bots call, with the documented request and
response shapes and error shapes, on a loopback port; records every call; and lets a test wait
on a condition over the recorded calls (no sleeps)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import uvicorn
from starlette.datastructures import UploadFile
from starlette.requests import Request

from conftest import ServerProcess, free_port

T = TypeVar("T")
WAIT_S = 60.0


@dataclass
class Call:
    """One request the bot made: the API method, its parameters (JSON-typed values decoded),
    uploaded files by field name, and what the stand-in answered."""

    method: str
    params: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    answer: Any = None


class Standin:
    """An ASGI app served by uvicorn in a background thread on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[Call] = []
        self.changed = threading.Condition()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def app(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=self.port, lifespan="off",
                                access_log=False, log_config=None, timeout_graceful_shutdown=2)
        self._server = server = uvicorn.Server(config)
        server.install_signal_handlers = False  # type: ignore[attr-defined]

        def serve() -> None:
            self.loop = loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(server.serve())
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not server.started:  # a thread starting: no event to wait on
            assert time.monotonic() < deadline, "stand-in did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.closing)
        if self._thread is not None:
            self._thread.join(10)

    def closing(self) -> None:
        """Called in the server's loop on `stop`: end requests that wait (long polls)."""

    def record(self, call: Call) -> None:
        """A call arrived (recorded before it is answered: a held call shows)."""
        with self.changed:
            self.calls.append(call)
            self.changed.notify_all()

    def answered(self, call: Call, answer: Any) -> None:
        """The call's answer, once the stand-in's state reflects it."""
        with self.changed:
            call.answer = answer
            self.changed.notify_all()

    def wait(self, check: Callable[[], T | None], timeout: float = WAIT_S,
             what: str = "a condition") -> T:
        """The first truthy `check()` (re-run whenever a call is recorded); fails with the
        calls seen so far after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                result = check()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = "\n".join(f"  {c.method} {str(c.params)[:300]} -> {str(c.answer)[:200]}"
                                     for c in self.calls[-30:] if c.method != "getUpdates")
                    raise AssertionError(f"timed out waiting for {what}; last calls:\n{seen}")
                self.changed.wait(left)

    def called(self, method: str, **match: Any) -> list[Call]:
        """The calls of `method` whose parameters include `match`."""
        with self.changed:
            return [c for c in self.calls if c.method == method
                    and all(c.params.get(k) == v for k, v in match.items())]


async def read_params(request: Request, json_fields: tuple[str, ...] = ()) -> tuple[
        dict[str, Any], dict[str, bytes]]:
    """A Web API request's parameters from wherever the client put them (query string, form,
    multipart or JSON body, as both APIs accept), and its uploaded files. `json_fields` are
    decoded from their JSON-serialized form-field strings."""
    params: dict[str, Any] = dict(request.query_params)
    files: dict[str, bytes] = {}
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        body = await request.body()
        if body:
            params.update(orjson.loads(body))
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        async with request.form() as form:  # closes the uploads' temporary files
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files[key] = await value.read()
                    params[f"{key}_filename"] = value.filename
                else:
                    params[key] = value
    for key in json_fields:
        if isinstance(params.get(key), str):
            params[key] = orjson.loads(params[key])
    return params, files


class BotProcess:
    """`python -m batchserve bot KIND ...` as a real process, its log in a file."""

    def __init__(self, kind: str, *args: str, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batchserve", "bot", kind, *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )

    def logs(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the bot did not exit in {timeout_s} s:\n{self.logs()}") from None
        finally:
            self._log.close()

    def stop(self) -> int:
        """SIGTERM, then its exit code (killed and failed past the deadline)."""
        if self.alive():
            self.signal()
        return self.wait()


def jobs_queued(server: ServerProcess) -> float:
    """`batchserve_jobs_total{status="queued"}`: jobs the server ever accepted."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=10).text
    match = re.search(r'^batchserve_jobs_total\{status="queued"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
