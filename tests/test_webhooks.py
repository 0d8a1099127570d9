"""Webhooks against a real loopback receiver (uvicorn in the test's loop): one signed POST of the
final job JSON, retries with backoff, no redirects, and refusal of hosts not allowed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import uvicorn
from inprocess import InProcess, in_process
from starlette.requests import Request
from starlette.responses import Response
from test_reliability import eventually

from batchserve.jobs.webhooks import WebhookSender, check_url
from batchserve.settings import Settings, SettingsError

from conftest import free_port
from fakes import FakeEngine

SECRET = "webhook-secret-0123456789"
SMALL = {"prompt": "a cube", "width": 64, "height": 64, "inference_steps": 1}


@dataclass
class Receiver:
    """Answers each POST with the next status of `statuses` (the last one repeats)."""

    statuses: list[int]
    calls: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        self.calls.append((request.url.path, dict(request.headers), await request.body()))
        status = self.statuses[min(len(self.calls), len(self.statuses)) - 1]
        headers = {"Location": "/elsewhere"} if 300 <= status < 400 else {}
        await Response(b"", status_code=status, headers=headers)(scope, receive, send)


@contextlib.asynccontextmanager
async def receiver(*statuses: int) -> AsyncIterator[Receiver]:
    app = Receiver(list(statuses))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started)
        app.url = f"http://127.0.0.1:{port}/hook"
        yield app
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serving(delays: list[float], **overrides: Any) -> AsyncIterator[InProcess]:
    async def no_sleep(seconds: float) -> None:
        delays.append(seconds)

    sender = WebhookSender(SECRET, frozenset({"127.0.0.1"}), sleep=no_sleep)
    async with in_process(FakeEngine(), max_wait_ms=0, webhook_secret=SECRET,
                          webhook_allow_hosts="127.0.0.1, localhost",
                          backends={"webhooks": sender}, **overrides) as app:
        yield app


async def run_job(app: InProcess, hook: str) -> str:
    response = await app.client.post("/v1/jobs", json={**SMALL, "webhook": hook})
    assert response.status_code == 202, response.text
    job = str(response.json()["id"])
    await app.service.jobs.wait(job, 30)
    return job


async def test_one_signed_post_of_the_final_job_json() -> None:
    delays: list[float] = []
    async with receiver(204) as hook, serving(delays) as app:
        job = await run_job(app, hook.url)
        await app.service.jobs.webhooks.close(10)  # type: ignore[union-attr]
        assert len(hook.calls) == 1
        path, headers, body = hook.calls[0]
        assert path == "/hook" and headers["content-type"] == "application/json"
        expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-batchserve-signature"] == f"sha256={expected}"
        assert headers["x-batchserve-delivery"] == job
        sent = orjson.loads(body)
        assert sent == (await app.client.get(f"/v1/jobs/{job}")).json()
        assert sent["status"] == "succeeded"
        assert sent["result"]["url"] == f"http://testserver/v1/jobs/{job}/image"
        assert "webhook" not in sent["request"] and delays == []


async def test_retried_with_backoff_until_it_is_taken() -> None:
    delays: list[float] = []
    async with receiver(500, 503, 200) as hook, serving(delays) as app:
        await run_job(app, hook.url)
        await app.service.jobs.webhooks.close(10)  # type: ignore[union-attr]
        assert len(hook.calls) == 3
        assert len({body for _, _, body in hook.calls}) == 1  # the same body each time
        assert delays == [1.0, 4.0]


async def test_three_tries_at_most_and_redirects_never_followed() -> None:
    delays: list[float] = []
    async with receiver(500) as failing, receiver(302) as moving, serving(delays) as app:
        await run_job(app, failing.url)
        await run_job(app, moving.url)
        await app.service.jobs.webhooks.close(10)  # type: ignore[union-attr]
        assert len(failing.calls) == 3
        assert [path for path, _, _ in moving.calls] == ["/hook"]  # not /elsewhere, not again


async def test_a_canceled_job_sends_its_webhook_too() -> None:
    import threading

    delays: list[float] = []
    async with receiver(200) as hook, serving(delays) as app:
        gate = threading.Event()
        app.engine.gate = gate
        response = await app.client.post("/v1/jobs", json={**SMALL, "webhook": hook.url})
        job = response.json()["id"]
        await asyncio.to_thread(app.engine.started.wait, 5)
        await app.client.delete(f"/v1/jobs/{job}")
        gate.set()
        await app.service.jobs.webhooks.close(10)  # type: ignore[union-attr]
        assert [orjson.loads(body)["status"] for _, _, body in hook.calls] == ["canceled"]


@pytest.mark.parametrize(("hook", "words"), [
    ("http://example.com/hook", "'example.com' is not allowed"),
    ("http://127.0.0.1.example.com/hook", "not allowed"),
    ("ftp://127.0.0.1/hook", "http or https"),
    ("http://user:pw@127.0.0.1/hook", "credentials"),
    ("http://127.0.0.1:99999/hook", "not a valid URL"),
    ("not a url", "http or https"),
    (17, "http(s) URL"),
])
async def test_webhooks_to_hosts_not_allowed_are_refused(hook: object, words: str) -> None:
    async with serving([]) as app:
        response = await app.client.post("/v1/jobs", json={**SMALL, "webhook": hook})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["field"] == "webhook" and words in error["message"]
        assert await app.service.jobs.queue.waiting() == 0 and app.engine.batches == []


async def test_webhooks_are_refused_when_no_host_is_allowed() -> None:
    async with in_process() as app:
        response = await app.client.post("/v1/jobs",
                                         json={**SMALL, "webhook": "http://127.0.0.1/h"})
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "webhook"
        assert "disabled" in response.json()["error"]["message"]


def test_allowed_hosts_need_a_secret() -> None:
    with pytest.raises(SettingsError, match="--webhook-secret"):
        Settings(webhook_allow_hosts="hooks.example.com")
    with pytest.raises(SettingsError, match="--webhook-secret"):
        Settings(webhook_allow_hosts="a.example", webhook_secret="short")
    settings = Settings(webhook_allow_hosts="A.example, b.example", webhook_secret=SECRET)
    assert settings.webhook_hosts() == {"a.example", "b.example"}
    assert settings.public()["webhook_secret"] == "set"
    assert check_url("https://a.example/x", settings.webhook_hosts()) == "https://a.example/x"
