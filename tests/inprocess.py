"""The app served in the test's own event loop with a `FakeEngine` injected (no uvicorn).

httpx's `ASGITransport` drives ordinary requests; `call_asgi` drives one request by hand so a
test can make its client disconnect (ASGITransport cannot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from starlette.applications import Starlette
from starlette.types import Message

from batchserve.api import create_app
from batchserve.service import Service
from batchserve.settings import Settings

from fakes import FakeEngine


@dataclass
class InProcess:
    """A READY `Service` around `engine`, its Starlette app, and an httpx client on it."""

    client: httpx.AsyncClient
    service: Service
    app: Starlette
    engine: FakeEngine

    def metric(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def in_process(
    engine: FakeEngine | None = None, *, backends: dict[str, Any] | None = None,
    image_inputs: frozenset[str] | None = None, **overrides: Any
) -> AsyncIterator[InProcess]:
    """`overrides` are `Settings` fields; warm-up is off and the model is named `fake`.
    `backends` are `Service` keywords replacing the job backends (`queue`, `store`,
    `webhooks`). `image_inputs` says what the fake model takes besides a prompt (the served
    model's `engines.capabilities.image_inputs`; by default the diffusers engine's, both)."""
    engine = engine or FakeEngine()
    settings = Settings(**{"model": "fake", "warmup": "", **overrides})
    service = Service(settings, engine_factory=lambda _: engine, **(backends or {}))
    if image_inputs is not None:
        service.limits = dataclasses.replace(service.limits, image_inputs=image_inputs)
    app = create_app(settings, service)
    await service.start()
    assert await service.wait_loaded() == Service.READY
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield InProcess(client, service, app, engine)
    finally:
        gate = getattr(engine, "gate", None)  # a real engine has none
        if gate is not None:
            gate.set()  # never leave the worker thread parked
        await service.stop()


@dataclass
class RawCall:
    """One `POST /t2i` driven through the raw ASGI interface; `leave()` disconnects it."""

    task: asyncio.Task[None]
    gone: asyncio.Event
    sent: list[Message] = field(default_factory=list)

    def leave(self) -> None:
        self.gone.set()

    @property
    def status(self) -> int | None:
        for message in self.sent:
            if message["type"] == "http.response.start":
                return int(message["status"])
        return None


def call_asgi(app: Starlette, body: dict[str, Any]) -> RawCall:
    """Starts the request; after its body, `receive()` blocks until `leave()` and then reports
    `http.disconnect`, exactly as uvicorn does when the client closes its socket."""
    gone = asyncio.Event()
    sent: list[Message] = []
    raw = orjson.dumps(body)
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/t2i", "raw_path": b"/t2i", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(raw)).encode())],
    }
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    task = asyncio.create_task(app(scope, receive, send))
    return RawCall(task, gone, sent)
