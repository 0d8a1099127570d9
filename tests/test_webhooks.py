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

from batchserve.errors import ValidationError
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
    port: int = 0

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
        app.port = port
        yield app
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serving(delays: list[float], *hooks: Receiver, **overrides: Any
                  ) -> AsyncIterator[InProcess]:
    """A server whose webhooks may go to `hooks` (loopback: private addresses allowed)."""
    async def no_sleep(seconds: float) -> None:
        delays.append(seconds)

    hosts = ",".join(["127.0.0.1", "localhost", *(f"127.0.0.1:{h.port}" for h in hooks)])
    settings = Settings(webhook_allow_hosts=hosts, webhook_secret=SECRET)
    sender = WebhookSender(SECRET, settings.webhook_hosts(), allow_private=True, sleep=no_sleep)
    async with in_process(FakeEngine(), max_wait_ms=0, webhook_secret=SECRET,
                          webhook_allow_hosts=hosts,
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
    async with receiver(204) as hook, serving(delays, hook) as app:
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
    async with receiver(500, 503, 200) as hook, serving(delays, hook) as app:
        await run_job(app, hook.url)
        await app.service.jobs.webhooks.close(10)  # type: ignore[union-attr]
        assert len(hook.calls) == 3
        assert len({body for _, _, body in hook.calls}) == 1  # the same body each time
        assert delays == [1.0, 4.0]


async def test_three_tries_at_most_and_redirects_never_followed() -> None:
    delays: list[float] = []
    async with receiver(500) as failing, receiver(302) as moving, \
            serving(delays, failing, moving) as app:
        await run_job(app, failing.url)
        await run_job(app, moving.url)
        await app.service.jobs.webhooks.close(10)  # type: ignore[union-attr]
        assert len(failing.calls) == 3
        assert [path for path, _, _ in moving.calls] == ["/hook"]  # not /elsewhere, not again


async def test_a_canceled_job_sends_its_webhook_too() -> None:
    import threading

    delays: list[float] = []
    async with receiver(200) as hook, serving(delays, hook) as app:
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
    ("http://example.com/hook", "'example.com' on port 80 is not allowed"),
    ("http://127.0.0.1:6379/hook", "on port 6379 is not allowed"),  # a bare host: 80/443 only
    ("http://127.0.0.1/h\nX-Evil: 1", "control characters"),  # was 202, then never sent
    ("http://127.0.0.1/a b", "spaces"),
    ("http://127.0.0.1.example.com/hook", "not allowed"),
    ("ftp://127.0.0.1/hook", "http or https"),
    ("http://user:pw@127.0.0.1/hook", "credentials"),
    ("http://127.0.0.1:99999/hook", "not a valid URL"),
    ("not-a-url", "http or https"),
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


def test_allow_list_entries_are_host_or_host_port() -> None:
    settings = Settings(webhook_allow_hosts="hooks.example, redis.example:8080, [::1]:9000",
                        webhook_secret=SECRET)
    hosts = settings.webhook_hosts()
    assert check_url("https://hooks.example/x", hosts) and check_url("http://hooks.example/", hosts)
    assert check_url("http://redis.example:8080/", hosts) and check_url("http://[::1]:9000/", hosts)
    for url in ("http://hooks.example:6379/", "http://redis.example/", "http://[::1]/"):
        with pytest.raises(ValidationError, match="not allowed"):
            check_url(url, hosts)
    with pytest.raises(SettingsError, match="HOST:PORT"):
        Settings(webhook_allow_hosts="hooks.example:99999", webhook_secret=SECRET)


@pytest.mark.parametrize(("address", "sent"), [
    ("127.0.0.1", False), ("10.1.2.3", False), ("169.254.169.254", False),
    ("::ffff:192.168.0.1", False), ("fd00::1", False), ("93.184.215.14", True)])
async def test_the_host_is_resolved_at_send_time_and_private_addresses_refused(
        address: str, sent: bool) -> None:
    """An allowed name that resolves to an internal address is not sent to (unless
    --webhook-allow-private); the request goes to the address that was checked."""
    posted: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("hooks.example", 443)
        return [address]

    sender = WebhookSender(SECRET, frozenset({"hooks.example"}), resolver=resolver, tries=1)

    async def post(target: Any, body: bytes, headers: dict[str, str]) -> str:
        posted.append(str(target.url))
        assert target.host_header == "hooks.example" and target.server_name == "hooks.example"
        return "ok"

    sender._post = post  # type: ignore[method-assign]
    assert await sender.deliver("https://hooks.example/h", "job1", b"{}") is sent
    assert len(posted) == int(sent)
    if sent:
        assert posted == [f"https://{address}/h"]
    sender.allow_private = True
    assert await sender.deliver("https://hooks.example/h", "job2", b"{}")


async def test_webhook_events_filter_started_progress_and_completed(tmp_path: Any) -> None:
    """Replicate's filter: `started` when a worker begins it, `progress` at most every
    `progress_webhook_s` with its step, `completed` at the end; the event in a header."""
    from test_progress import Held

    from batchserve.engines.diffusion import DiffusionEngine

    engine = Held(DiffusionEngine.load(Settings(model="tiny", warmup="")), hold_at=2)
    engine.gate.set()
    hosts = "127.0.0.1,127.0.0.1:{port}"
    async with receiver(204) as hook:
        allowed = hosts.format(port=hook.port)
        sender = WebhookSender(SECRET, Settings(webhook_allow_hosts=allowed,
                                                webhook_secret=SECRET).webhook_hosts(),
                               allow_private=True)
        async with in_process(engine, max_wait_ms=0,  # type: ignore[arg-type]
                              webhook_secret=SECRET, webhook_allow_hosts=allowed,
                              backends={"webhooks": sender}) as app:
            app.service.jobs.progress_webhook_s = 0.01
            body = {**SMALL, "inference_steps": 4, "webhook": hook.url,
                    "webhook_events": ["started", "progress"]}
            made = await app.client.post("/v1/jobs", json=body)
            assert made.status_code == 202, made.text
            await asyncio.to_thread(engine.reached.wait, 30)
            await eventually(lambda: any(h["x-batchserve-event"] == "progress"
                                         for _, h, _ in hook.calls), 30)
            engine.resume.set()
            await app.service.jobs.wait(made.json()["id"], 30)
            await sender.close(10)
            events = [h["x-batchserve-event"] for _, h, _ in hook.calls]
            assert events[0] == "started" and "completed" not in events, events
            progress = [orjson.loads(b) for _, h, b in hook.calls
                        if h["x-batchserve-event"] == "progress"]
            assert progress[0]["progress"]["steps"] == 4 and progress[0]["status"] == "running"
            bad = await app.client.post("/v1/jobs", json={**SMALL, "webhook_events": ["started"]})
            assert bad.status_code == 422 and bad.json()["error"]["field"] == "webhook_events"
            odd = await app.client.post("/v1/jobs", json={**SMALL, "webhook": hook.url,
                                                          "webhook_events": ["output"]})
            assert odd.status_code == 422 and "started, progress, completed" in odd.text
