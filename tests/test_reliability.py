"""Fault injection: every accepted request gets exactly one response, whatever the engine does.

The app runs in the test's event loop with a `FakeEngine` held behind a `threading.Event`
(tests/inprocess.py), so a test decides when a batch ends; the real-socket test at the bottom
runs `batchserve serve --model sim` in a subprocess and closes its sockets for real.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import socket
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import uvicorn
from inprocess import InProcess, call_asgi, in_process
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import Message

from batchserve.api import create_app
from batchserve.engines import GenerationItem
from batchserve.errors import EngineOutOfMemory
from batchserve.server import JSONFormatter, Server
from batchserve.service import Service
from batchserve.settings import Settings

from conftest import ServerProcess, running_server
from fakes import FakeEngine

# One request; `body(seed=...)` varies it. Key 64x64x1x7.5 unless width/height are given.
BASE = {"prompt": "a red fox in the snow", "width": 64, "height": 64, "inference_steps": 1}
SECRET_TEXT = "kernel exploded at /opt/models/secret/unet.py"


def body(seed: int, **fields: Any) -> dict[str, Any]:
    return {**BASE, "seed": seed, **fields}


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Polls state changed by the worker thread or the loop, within a bounded deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.002)


async def started(engine: FakeEngine, batches: int = 1) -> None:
    """Waits until the engine has begun `batches` batches."""
    await eventually(lambda: len(engine.batches) >= batches)


def post(app: InProcess, payload: dict[str, Any], **kw: Any) -> asyncio.Task[httpx.Response]:
    return asyncio.create_task(app.client.post("/t2i", json=payload, **kw))


async def still_pending(task: Awaitable[Any]) -> bool:
    done, _ = await asyncio.wait({asyncio.ensure_future(task)}, timeout=0.01)
    return not done


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The one error shape, checked; returns its inner object."""
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message", "field"}
    assert isinstance(data["error"]["message"], str)
    for leak in ("Traceback", "File \"", "site-packages", "/opt/", "/work/"):
        assert leak not in response.text
    return dict(data["error"])


def seeds(engine: FakeEngine) -> list[list[int]]:
    return [[item.seed for item in batch] for batch in engine.batches]


def raise_if(predicate: Callable[[Sequence[GenerationItem]], bool], exc: Exception
             ) -> Callable[[Sequence[GenerationItem]], None]:
    def fail(items: Sequence[GenerationItem]) -> None:
        if predicate(items):
            raise exc

    return fail


# -- fault isolation -----------------------------------------------------------------------


async def test_engine_exception_fails_only_the_poisonous_request_without_leaking_details(
) -> None:
    poisoned = raise_if(lambda items: any(i.prompt == "poison" for i in items),
                        RuntimeError(SECRET_TEXT))
    engine = FakeEngine(fail=poisoned)
    async with in_process(engine, max_batch_size=2, max_wait_ms=60_000) as app:
        bad, neighbour = post(app, body(1, prompt="poison")), post(app, body(2))
        other = [post(app, body(3 + n, width=128)) for n in range(2)]
        responses = await asyncio.gather(bad, neighbour, *other)
        # The stranger batched with the poison is retried without it and gets its image.
        assert [r.status_code for r in responses] == [500, 200, 200, 200]
        error = error_of(responses[0])
        assert error["code"] == "generation_failed"
        assert "generation failed" in error["message"] and "exploded" not in error["message"]
        assert responses[1].headers["x-batch-size"] == "1"
        assert seeds(engine)[:3] == [[1, 2], [1], [2]]
        assert app.metric("batchserve_requests_rejected_total", reason="failed") == 1
        again = await asyncio.gather(post(app, body(7)), post(app, body(8)))
        assert [r.status_code for r in again] == [200, 200]  # the loop lived on


@pytest.mark.parametrize(
    ("fits", "sizes", "header"),
    [
        (1, [4, 2, 1, 1, 2, 1, 1], "1"),  # only single items fit: split down to 1
        (2, [4, 2, 2], "2"),
    ],
)
async def test_out_of_memory_splits_the_batch_in_halves_until_it_fits(
    fits: int, sizes: list[int], header: str
) -> None:
    engine = FakeEngine(fail=raise_if(lambda items: len(items) > fits, EngineOutOfMemory("oom")))
    async with in_process(engine, max_batch_size=4, max_wait_ms=60_000) as app:
        responses = await asyncio.gather(*(post(app, body(n)) for n in range(4)))
        assert [r.status_code for r in responses] == [200] * 4
        assert {r.headers["x-batch-size"] for r in responses} == {header}
        assert [len(b) for b in engine.batches] == sizes
        assert app.metric("batchserve_images_total") == 4


async def test_item_that_oomes_alone_fails_alone() -> None:
    engine = FakeEngine(fail=raise_if(lambda items: any(i.prompt == "huge" for i in items),
                                      EngineOutOfMemory("oom")))
    async with in_process(engine, max_batch_size=4, max_wait_ms=60_000) as app:
        payloads = [body(0, prompt="huge"), body(1), body(2), body(3)]
        responses = await asyncio.gather(*(post(app, p) for p in payloads))
        assert [r.status_code for r in responses] == [500, 200, 200, 200]
        error = error_of(responses[0])
        assert error["code"] == "generation_failed" and "memory" in error["message"]
        # [4] -> [0,1] -> [0] fails, [1] runs alone; [2,3] fit together
        assert seeds(engine) == [[0, 1, 2, 3], [0, 1], [0], [1], [2, 3]]
        assert [r.headers["x-batch-size"] for r in responses[1:]] == ["1", "2", "2"]


def test_out_of_memory_empties_the_cuda_cache_after_the_attempt_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The diffusers engine frees the CUDA cache before the batcher retries smaller halves, and
    only once the failed attempt's tensors (held by the traceback's frames) are released:
    `empty_cache` cannot return memory that a live tensor still holds."""
    torch = pytest.importorskip("torch")
    from batchserve.engines import tiny
    from batchserve.engines.diffusion import DiffusionEngine, plan_tuning

    emptied: list[bool] = []  # per call: was the attempt's activation still alive?
    attempt: list[weakref.ref[object]] = []

    class OomPipe:  # the tiny model's text side (the engine encodes prompts); denoising OOMs
        def __init__(self) -> None:
            real = tiny.build_pipeline()
            self.tokenizer, self.text_encoder, self.unet = (
                real.tokenizer, real.text_encoder, real.unet)

        def __call__(self, **_: object) -> None:
            activation = torch.zeros(256)  # lives in this frame, like a UNet's activations
            attempt.append(weakref.ref(activation))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    class CpuGenerator:  # the plan says cuda; this machine has none
        def __init__(self, device: str) -> None:
            self.device = device

        def manual_seed(self, seed: int) -> CpuGenerator:
            return self

    settings = Settings(warmup="")
    engine = DiffusionEngine(OomPipe(), plan_tuning(settings, cuda=True, xformers=False),
                             settings)
    monkeypatch.setattr(torch, "Generator", CpuGenerator)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(attempt[0]() is None))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)
    gc.disable()  # reference counting alone must free it: no cycle left for the collector
    try:
        with pytest.raises(EngineOutOfMemory) as caught:
            engine.generate([GenerationItem("p", "", 1, 64, 64, 1, 7.5)])
    finally:
        gc.enable()
    assert emptied == [True]
    error = caught.value
    assert error.__context__ is None and error.__cause__ is None  # nothing chained to it


async def test_slow_batch_never_blocks_health_metrics_or_info() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        slow = post(app, body(1))
        await started(engine)
        for path in ("/healthz", "/readyz", "/metrics", "/v1/info"):
            response = await asyncio.wait_for(app.client.get(path), 2)
            assert response.status_code == 200, path
        assert await still_pending(slow)
        assert engine.gate is not None
        engine.gate.set()
        assert (await slow).status_code == 200


# -- deadlines -----------------------------------------------------------------------------


async def test_request_past_its_timeout_gets_504_on_time_and_never_runs() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        busy = post(app, body(1))
        await started(engine)
        late = await asyncio.wait_for(post(app, body(2, timeout_s=0.05)), 5)
        # answered while the engine is still busy, not when the batch ahead ends
        assert engine.gate is not None and not engine.gate.is_set()
        assert late.status_code == 504 and error_of(late)["code"] == "timeout"
        engine.gate.set()
        assert (await busy).status_code == 200
        assert seeds(engine) == [[1]]
        assert app.metric("batchserve_requests_rejected_total", reason="timeout") == 1


async def test_default_timeout_applies_while_a_partial_batch_waits() -> None:
    """`--request-timeout-s` is the default `timeout_s`; it fires before a long max wait."""
    engine = FakeEngine()
    async with in_process(engine, request_timeout_s=0.05, max_wait_ms=60_000) as app:
        response = await asyncio.wait_for(post(app, body(1)), 5)
        assert response.status_code == 504 and error_of(response)["code"] == "timeout"
        assert engine.batches == []


# -- client disconnects --------------------------------------------------------------------


async def test_client_gone_before_its_batch_is_dropped_and_never_generated() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        busy = post(app, body(1))
        await started(engine)
        queued = call_asgi(app.app, body(2))
        await eventually(lambda: app.service.batcher.depth == 1)
        queued.leave()
        await asyncio.wait_for(queued.task, 5)
        await eventually(lambda: app.service.batcher.depth == 0)
        assert app.metric("batchserve_requests_rejected_total", reason="cancelled") == 1
        assert engine.gate is not None
        engine.gate.set()
        assert (await busy).status_code == 200
        await eventually(lambda: app.service.batcher.depth == 0 and len(engine.batches) == 1)
        assert seeds(engine) == [[1]]
        assert app.metric("batchserve_images_total") == 1
        assert app.metric("batchserve_requests_rejected_total", reason="cancelled") == 1


async def test_client_gone_mid_batch_has_its_result_discarded() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=2, max_wait_ms=60_000) as app:
        leaving = call_asgi(app.app, body(1))
        staying = post(app, body(2))
        await started(engine)
        assert len(engine.batches[0]) == 2
        leaving.leave()
        await asyncio.wait_for(leaving.task, 5)  # its handler returns at once
        assert engine.gate is not None
        engine.gate.set()
        response = await staying
        assert response.status_code == 200 and response.headers["x-batch-size"] == "2"
        # both images were generated (the batch had a client left): one delivered (counted in
        # images_total), one made for nobody (wasted, and never encoded)
        await eventually(lambda: app.metric("batchserve_images_total") == 1)
        assert app.metric("batchserve_wasted_images_total", reason="cancelled") == 1
        assert app.metric("batchserve_requests_rejected_total", reason="cancelled") == 1


async def test_client_gone_while_uploading_counts_as_cancelled_not_as_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"prompt": "a', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/t2i", "raw_path": b"/t2i",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")]}
    with caplog.at_level(logging.INFO):
        async with in_process(FakeEngine()) as app:
            await asyncio.wait_for(app.app(scope, receive, send), 5)
            assert app.metric("batchserve_requests_rejected_total", reason="cancelled") == 1
            assert app.metric("batchserve_requests_rejected_total", reason="failed") == 0
            assert app.engine.batches == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- backpressure and readiness ------------------------------------------------------------


async def test_queue_over_its_bound_gets_429_with_retry_after() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, max_queue=2,
                          refusal_hold_s=0) as app:
        first = post(app, body(1))
        await started(engine)
        queued = [post(app, body(2)), post(app, body(3))]
        await eventually(lambda: app.service.batcher.depth == 2)
        rejected = await app.client.post("/t2i", json=body(4))
        assert rejected.status_code == 429 and error_of(rejected)["code"] == "queue_full"
        # No batch has ended yet, so 1 s per batch is assumed: 2 queued at 1 per batch = 2 s.
        assert rejected.headers["retry-after"] == "2"
        assert app.metric("batchserve_requests_rejected_total", reason="queue_full") == 1
        assert engine.gate is not None
        engine.gate.set()
        responses = await asyncio.gather(first, *queued)
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert 4 not in {s for batch in seeds(engine) for s in batch}


async def test_a_request_over_the_bound_is_held_for_a_place_not_refused_at_once() -> None:
    """`--refusal-hold-s`: a client that would retry at once on a 429 waits for a place
    instead; it gets its image once the queue moves, and no refusal is counted."""
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, max_queue=2) as app:
        first = post(app, body(1))
        await started(engine)
        queued = [post(app, body(2)), post(app, body(3))]
        await eventually(lambda: app.service.batcher.depth == 2)
        held = post(app, body(4))
        await eventually(lambda: app.service.waiting_room.held == 1)
        assert not held.done()
        assert engine.gate is not None
        engine.gate.set()
        responses = await asyncio.gather(first, *queued, held)
        assert [r.status_code for r in responses] == [200] * 4
        assert app.metric("batchserve_requests_rejected_total", reason="queue_full") == 0
        assert app.metric("batchserve_refusals_held_ended_total", outcome="admitted") == 1


async def test_not_ready_while_loading_answers_503_with_retry_after() -> None:
    loading = threading.Event()
    engine = FakeEngine()

    def slow_factory(_: Settings) -> FakeEngine:
        loading.wait(timeout=30)
        return engine

    settings = Settings(model="fake", warmup="")
    service = Service(settings, engine_factory=slow_factory)
    app = create_app(settings, service)
    await service.start()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.post("/t2i", json=body(1))
            assert response.status_code == 503 and error_of(response)["code"] == "not_ready"
            assert int(response.headers["retry-after"]) >= 1
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
            loading.set()
            assert await service.wait_loaded() == Service.READY
            assert (await client.get("/readyz")).status_code == 200
    finally:
        loading.set()
        await service.stop()


# -- graceful drain (in process; tests/test_shutdown.py does it with SIGTERM) ---------------


async def test_drain_finishes_queued_and_in_flight_and_refuses_new_work() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        accepted = [post(app, body(n)) for n in range(3)]
        await started(engine)
        await eventually(lambda: app.service.batcher.depth == 2)
        drain = asyncio.create_task(app.service.drain())
        await eventually(lambda: app.service.state == Service.DRAINING)
        assert (await app.client.get("/readyz")).status_code == 503
        refused = await app.client.post("/t2i", json=body(9))
        assert refused.status_code == 503 and error_of(refused)["code"] == "draining"
        assert "retry-after" in refused.headers
        assert engine.gate is not None
        engine.gate.set()
        assert [r.status_code for r in await asyncio.gather(*accepted)] == [200, 200, 200]
        assert await asyncio.wait_for(drain, 5) is True


async def test_drain_timeout_answers_what_is_left_with_503() -> None:
    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0, drain_timeout_s=0.05) as app:
        accepted = [post(app, body(n)) for n in range(2)]
        await started(engine)
        await eventually(lambda: app.service.batcher.depth == 1)
        assert await asyncio.wait_for(app.service.drain(), 5) is False
        responses = await asyncio.wait_for(asyncio.gather(*accepted), 5)
        for response in responses:  # in flight and queued alike: an answer, not a hang
            assert response.status_code == 503 and error_of(response)["code"] == "draining"


# -- the batch loop never dies silently ----------------------------------------------------


async def test_batch_loop_death_fails_its_requests_turns_unready_and_is_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with in_process(FakeEngine(), max_batch_size=1, max_wait_ms=0) as app:
        server = Server(uvicorn.Config(app.app, log_config=None), app.service)
        batcher = app.service.batcher
        pick = batcher._pick

        def broken_pick(now: float) -> Any:
            if batcher.depth:
                raise RuntimeError("scheduler bug")
            return pick(now)

        monkeypatch.setattr(batcher, "_pick", broken_pick)
        response = await asyncio.wait_for(app.client.post("/t2i", json=body(1)), 5)
        assert response.status_code == 500 and error_of(response)["code"] == "generation_failed"
        assert server.should_exit and server.exit_code == 1  # `batchserve serve` exits 1
        assert (await app.client.get("/readyz")).status_code == 503
        assert (await app.client.get("/healthz")).status_code == 503
        assert app.metric("batchserve_ready") == 0
        after = await app.client.post("/t2i", json=body(2))
        assert after.status_code == 503 and "retry-after" in after.headers


# -- access --------------------------------------------------------------------------------

KEY = "correct-horse-battery"


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        ("Bearer wrong-key-entirely", 401),
        (f"Basic {KEY}", 401),
        (f"Bearer {KEY}x", 401),
        ("Bearer ", 401),
        (f"Bearer {KEY}", 200),
        (f"bearer {KEY}", 200),
    ],
)
async def test_api_key_guards_t2i(authorization: str | None, status: int) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    async with in_process(FakeEngine(), api_key=KEY, max_batch_size=1, max_wait_ms=0) as app:
        response = await app.client.post("/t2i", json=body(1), headers=headers)
        assert response.status_code == status
        if status == 401:
            assert error_of(response)["code"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
            assert KEY not in response.text
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await app.client.get(path)).status_code == 200, path


async def test_metrics_can_be_protected_by_the_api_key() -> None:
    async with in_process(FakeEngine(), api_key=KEY, protect_metrics=True) as app:
        assert (await app.client.get("/metrics")).status_code == 401
        ok = await app.client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and b"batchserve_ready" in ok.content
        assert (await app.client.get("/healthz")).status_code == 200
        info = (await app.client.get("/v1/info")).json()
        assert info["auth"] == {"t2i": True, "metrics": True} and KEY not in str(info)


async def test_api_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("batchserve.tenants.hmac.compare_digest", spy)
    async with in_process(FakeEngine(), api_key=KEY) as app:
        response = await app.client.post("/t2i", json=body(1), headers={
            "authorization": "Bearer guess"})
        assert response.status_code == 401
    # Digests of equal length, so neither the key's length nor a prefix shows in the timing.
    assert calls == [(hashlib.sha256(b"guess").digest(), hashlib.sha256(KEY.encode()).digest())]


def test_api_key_comes_from_the_environment() -> None:
    settings = Settings.from_sources(env={"BATCHSERVE_API_KEY": KEY})
    assert settings.api_key == KEY and settings.public()["api_key"] == "set"


# -- logs ----------------------------------------------------------------------------------


@contextlib.contextmanager
def access_log(caplog: pytest.LogCaptureFixture) -> Iterator[list[dict[str, Any]]]:
    """Each request's record, rendered the way the server writes it (one JSON line)."""
    lines: list[dict[str, Any]] = []
    with caplog.at_level(logging.INFO):
        yield lines
    formatter = JSONFormatter()
    for record in caplog.records:
        if record.name == "batchserve.access":
            text = formatter.format(record)
            assert "\n" not in text
            lines.append(orjson.loads(text))


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_one_structured_log_line_per_request_without_prompts_by_default(
    caplog: pytest.LogCaptureFixture, log_prompts: bool
) -> None:
    prompt = "a very private prompt 7c1e"
    with access_log(caplog) as lines:
        async with in_process(FakeEngine(), log_prompts=log_prompts, max_batch_size=1,
                              max_wait_ms=0) as app:
            ok = await app.client.post("/t2i", json=body(5, prompt=prompt),
                                       headers={"x-request-id": "req-1"})
            bad = await app.client.post("/t2i", json={"prompt": prompt, "width": 65})
    assert (ok.status_code, bad.status_code) == (200, 422)
    assert [line["status"] for line in lines] == [200, 422]
    first = lines[0]
    assert first["id"] == "req-1" and first["batch_size"] == 1
    assert first["key"] == "64x64x1x7.5/dpm++2m-karras"
    for timing in ("queue_ms", "inference_ms", "total_ms"):
        assert isinstance(first[timing], float)
    assert lines[1]["error"] == "validation_error"
    everything = caplog.text + "".join(orjson.dumps(line).decode() for line in lines)
    assert (prompt in everything) is log_prompts


async def test_unexpected_error_is_a_json_500_with_its_log_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug after generation (here: encoding) still gets one clean response and a log line."""
    def broken_encode(image: object, fmt: str, **_: object) -> bytes:
        raise OSError(SECRET_TEXT)

    with access_log(caplog) as lines:
        async with in_process(FakeEngine(), max_batch_size=1, max_wait_ms=0) as app:
            monkeypatch.setattr("batchserve.service.encode", broken_encode)
            response = await app.client.post("/t2i", json=body(1))
            assert response.status_code == 500
            assert error_of(response)["code"] == "internal_error"
            assert (await app.client.get("/healthz")).status_code == 200
    assert [line["status"] for line in lines] == [500]


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("GET", "/t2i", 405, "method_not_allowed"),
    ("POST", "/nowhere", 404, "not_found"),
    ("DELETE", "/healthz", 405, "method_not_allowed"),
])
async def test_routing_errors_use_the_one_json_shape(
    method: str, path: str, status: int, code: str
) -> None:
    async with in_process(FakeEngine()) as app:
        response = await app.client.request(method, path)
        assert response.status_code == status and error_of(response)["code"] == code
        if status == 405:  # RFC 9110: a 405 says which methods the route takes
            allowed = {m.strip() for m in response.headers["allow"].split(",")}
            assert allowed == ({"POST"} if path == "/t2i" else {"GET", "HEAD"})


@pytest.mark.parametrize(("sent", "echoed"), [
    ("req-1.a_B", True),
    ("x" * 64, True),
    ("x" * 65, False),
    ("req-1\n", False),  # `match` with `$` would accept a trailing newline
    ("req 1", False),
    ("", False),
])
async def test_request_id_is_echoed_only_when_it_fully_matches(sent: str, echoed: bool) -> None:
    """Driven through raw ASGI: an HTTP client would refuse to send a newline in a header."""
    sent_messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent_messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/t2i", "raw_path": b"/t2i",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
             "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"x-request-id", sent.encode())]}
    async with in_process(FakeEngine()) as app:
        await asyncio.wait_for(app.app(scope, receive, send), 5)
    start = next(m for m in sent_messages if m["type"] == "http.response.start")
    assert start["status"] == 422
    (rid,) = [v.decode() for k, v in start["headers"] if k.lower() == b"x-request-id"]
    assert (rid == sent) is echoed
    if not echoed:
        assert len(rid) == 16 and all(c in "0123456789abcdef" for c in rid)


# -- real sockets: uvicorn reports the disconnect ------------------------------------------


def scrape(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def wait_metric(server: ServerProcess, name: str, predicate: Callable[[float], bool],
                timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate(scrape(server).get(name, 0.0)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never satisfied the condition:\n{server.logs()}")
        time.sleep(0.01)  # polling an external process, bounded by the deadline


def raw_post(server: ServerProcess, payload: dict[str, Any]) -> socket.socket:
    data = orjson.dumps(payload)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /t2i HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_real_socket_disconnects_queued_and_in_flight(tmp_path: Path) -> None:
    """Two clients hang up over TCP: the queued one is never generated, the in-flight one's
    image is discarded; both count as cancelled, and the server keeps serving."""
    cancelled = "batchserve_requests_rejected_total{reason=cancelled}"
    with running_server("--model", "sim", "--sim-base-ms", "1500", "--max-batch-size", "1",
                        "--max-wait-ms", "0", tmp_path=tmp_path) as server:
        in_flight = raw_post(server, body(1))
        wait_metric(server, "batchserve_batches_total{trigger=full}", lambda v: v >= 1)
        queued = raw_post(server, body(2))
        wait_metric(server, "batchserve_queue_depth", lambda v: v == 1)
        queued.close()
        wait_metric(server, cancelled, lambda v: v == 1)  # dropped while the engine is busy
        in_flight.close()
        wait_metric(server, cancelled, lambda v: v == 2)
        after = scrape(server)
        assert after["batchserve_images_total"] == 0
        assert after["batchserve_queue_depth"] == 0
        assert after["batchserve_batches_total{trigger=full}"] == 1  # the queued one never ran
        ok = httpx.post(server.url + "/t2i", json=body(3), timeout=10)
        assert ok.status_code == 200
        assert scrape(server)["batchserve_images_total"] == 1
