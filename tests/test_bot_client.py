"""The bots' jobs-API client, in process against a fake jobs API (`standins.jobs_api`): busy
answers retried as Retry-After says within a budget, one Idempotency-Key for all tries, errors
as sentences, the event stream when the server offers one (and its reconnect with
Last-Event-ID), polling when it does not. Sleeps are injected: nothing waits for time."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import httpx
import pytest

from batchserve.bots.client import UNREACHABLE, JobsClient, JobView, ServerError, retry_after

from standins.jobs_api import FakeJobsAPI, error

KEY = "client-test-key-123"
BODY = {"prompt": "a cube", "width": 64, "height": 64}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_for(api: FakeJobsAPI, *, budget_s: float = 60.0,
               clock: FakeClock | None = None) -> tuple[JobsClient, list[float]]:
    clock = clock or FakeClock()
    waited: list[float] = []

    async def sleep(seconds: float) -> None:  # time passes only on the fake clock
        waited.append(seconds)
        clock.now += seconds

    client = JobsClient("http://batchserve.test/", KEY, retry_budget_s=budget_s,
                        transport=api.transport(), sleep=sleep, clock=clock)
    return client, waited


async def test_busy_answers_are_retried_as_retry_after_says_with_one_idempotency_key() -> None:
    api = FakeJobsAPI()
    api.script("POST /v1/jobs", error(503, "overloaded", "busy", Retry_After="3"),
               error(429, "queue_full", "full", Retry_After="1"))
    client, waited = client_for(api)
    announced: list[float] = []

    async def on_wait(seconds: float) -> None:
        announced.append(seconds)

    job = await client.submit(BODY, on_wait=on_wait)
    assert job.status == "queued" and waited == announced == [3.0, 1.0]
    posts = api.calls("POST", "/v1/jobs")
    keys = {r.headers["idempotency-key"] for r in posts}
    assert len(posts) == 3 and len(keys) == 1
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in posts)
    await client.aclose()


async def test_a_busy_server_past_the_budget_gets_a_sentence() -> None:
    api = FakeJobsAPI()
    api.script("POST /v1/jobs", *[error(503, "draining", "draining", Retry_After="10")] * 5)
    client, waited = client_for(api, budget_s=25)
    with pytest.raises(ServerError) as refused:
        await client.submit(BODY)
    assert waited == [10.0, 10.0]  # a third wait would end past the 25 s budget
    assert refused.value.sentence == ("The image server is busy or restarting. Please try "
                                      "again in a minute.")
    assert refused.value.retry_after_s == 10
    await client.aclose()


@pytest.mark.parametrize(("answer", "sentence"), [
    (error(422, "validation_error", "prompt must be at most 2000 characters"),
     "The image server did not accept this request: prompt must be at most 2000 characters."),
    (error(401, "unauthorized", "missing or invalid API key"),
     "The image server refused this bot's API key. The bot's operator must set "
     "--server-api-key."),
    (httpx.Response(500, text="<html>Internal Server Error</html>"),
     "The image server had a problem with this request. Please try again."),
])
async def test_errors_become_sentences(answer: httpx.Response, sentence: str) -> None:
    api = FakeJobsAPI()
    api.script("POST /v1/jobs", answer)
    client, _ = client_for(api)
    with pytest.raises(ServerError) as refused:
        await client.submit(BODY)
    assert refused.value.sentence == sentence and KEY not in sentence
    await client.aclose()


async def test_an_unreachable_server_is_said_so() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = JobsClient("http://batchserve.test", KEY, transport=httpx.MockTransport(refuse))
    with pytest.raises(ServerError) as refused:
        await client.info()
    assert refused.value.sentence == UNREACHABLE
    await client.aclose()


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("7") == 7.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after(later) or 0) <= 30


async def follow(client: JobsClient, job_id: str) -> list[JobView]:
    return [view async for view in client.follow(job_id)]


async def test_the_event_stream_is_followed_when_offered() -> None:
    api = FakeJobsAPI(events=True)
    client, _ = client_for(api)
    job = await client.submit(BODY)
    api.finish(job.id)
    views = await follow(client, job.id)
    assert [(v.status, v.position, v.fraction) for v in views] == [
        ("queued", 0, None), ("running", None, None), ("running", None, 0.5),
        ("succeeded", None, None)]
    assert views[-1].seed == 7 and views[-1].seconds == 2.5
    assert not api.calls("GET", f"/v1/jobs/{job.id}/image")
    assert [r.url.path for r in api.calls("GET", "/v1/jobs/")] == [f"/v1/jobs/{job.id}/events"]
    assert client.events_offered is True
    await client.aclose()


async def test_a_broken_stream_is_resumed_with_last_event_id() -> None:
    api = FakeJobsAPI(events=True)
    client = JobsClient("http://batchserve.test", KEY, transport=api.transport(),
                        sleep=api.sleep)
    job = await client.submit(BODY)
    partial = (f'id: 1\nevent: queued\ndata: {{"id": "{job.id}", "position": 3}}\n\n'
               f'id: 2\nevent: started\ndata: {{"id": "{job.id}"}}\n\n').encode()
    api.script(f"GET /v1/jobs/{job.id}/events",
               httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=partial))
    api.run(job.id)
    views = []
    async for view in client.follow(job.id):
        views.append(view)
        if len(views) == 3:  # the stream broke; the job was read once: finish it now
            api.finish(job.id)
    assert [(v.status, v.position, v.fraction) for v in views] == [
        ("queued", 3, None), ("running", None, None), ("running", None, None),
        ("running", None, 0.5), ("succeeded", None, None)]
    streams = api.calls("GET", f"/v1/jobs/{job.id}/events")
    assert "last-event-id" not in streams[0].headers
    assert [s.headers.get("last-event-id") for s in streams[1:]] == ["2"]
    await client.aclose()


async def test_without_an_event_stream_the_job_is_polled() -> None:
    api = FakeJobsAPI(events=False)
    clock = FakeClock()
    client = JobsClient("http://batchserve.test", KEY, transport=api.transport(),
                        sleep=api.sleep, clock=clock, poll_interval_s=0.5)
    job = await client.submit(BODY)
    seen: list[tuple[str, Any]] = []
    async for view in client.follow(job.id):
        seen.append((view.status, view.position if view.status == "queued" else view.fraction))
        if len(seen) == 1:
            api.run(job.id)
        elif len(seen) == 2:
            api.progress(job.id, 3, 4)
        elif len(seen) == 3:
            api.finish(job.id)
    assert seen == [("queued", 0), ("running", None), ("running", 0.75), ("succeeded", None)]
    assert client.events_offered is False and set(api.sleeps) == {0.5}
    second = await client.submit(BODY)
    api.finish(second.id)
    await follow(client, second.id)
    assert not api.calls("GET", f"/v1/jobs/{second.id}/events")  # remembered: no stream here
    await client.aclose()


async def test_a_job_gone_from_the_server_ends_following_with_a_sentence() -> None:
    api = FakeJobsAPI()
    client, _ = client_for(api)
    with pytest.raises(ServerError) as gone:
        await follow(client, "job_0000000000000000000099")
    assert gone.value.status == 404 and "no longer on the server" in gone.value.sentence
    await client.aclose()
