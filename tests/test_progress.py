"""Live progress: the board the engine writes each step to, a job's Server-Sent Events (memory,
and an api process streaming a job a worker runs over a real Redis), reconnects with
Last-Event-ID, A1111's `/sdapi/v1/progress` moving from 0 to 1 with a preview, and a reader
that stops reading holding nothing up.

The engine is the real `tiny` one, held at a chosen step behind thread events (no sleeps).
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

import httpx
import orjson
import pytest
from inprocess import in_process
from PIL import Image
from test_reliability import eventually

from batchserve.engines.diffusion import DiffusionEngine
from batchserve.jobs.events import ENDED, PROGRESS, JobEvents
from batchserve.jobs.memory import MemoryResultStore
from batchserve.jobs.redis import RedisQueue
from batchserve.progress import BATCH, ProgressBoard
from batchserve.settings import Settings

from conftest import running_server
from services import redis_server

BODY: dict[str, Any] = {"prompt": "a lighthouse", "width": 64, "height": 64,
                        "inference_steps": 4, "seed": 3}


class Held:
    """The tiny engine, its whole batches held before they start (`gate`) and at step
    `hold_at` (`reached` is set there; `resume` lets it go on)."""

    def __init__(self, engine: DiffusionEngine, hold_at: int = 0) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.hold_at = hold_at
        self.reached = threading.Event()
        self.resume = threading.Event()

    def generate(self, items: Sequence[Any], should_stop: Any = None, on_step: Any = None
                 ) -> list[Any]:
        assert self.gate.wait(60)

        def stepped(done: int, total: int, preview: Any) -> None:
            if on_step is not None:
                on_step(done, total, preview)
            if done == self.hold_at:
                self.reached.set()
                assert self.resume.wait(60)

        return self.engine.generate(items, should_stop, stepped)

    def info(self) -> Any:
        return self.engine.info()

    def warmup(self) -> None:
        return None

    def memory_bytes(self) -> Any:
        return None


@pytest.fixture(scope="module")
def tiny() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup=""))


def parse(stream: str) -> list[tuple[int, str, dict[str, Any]]]:
    events = []
    for block in stream.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        if "event" in fields:
            events.append((int(fields["id"]), fields["event"], orjson.loads(fields["data"])))
    return events


# -- the board ---------------------------------------------------------------------------------


async def test_the_board_keeps_the_newest_step_and_makes_previews_only_for_listeners() -> None:
    now = [100.0]
    board = ProgressBoard(preview_every=2, clock=lambda: now[0])
    assert not board.wants_preview("job", 2)  # nobody listens
    with board.listen("job"):
        assert board.wants_preview("job", 2) and not board.wants_preview("job", 3)
        woke = asyncio.ensure_future(board.changed("job", 30))
        await asyncio.sleep(0)
        threading.Thread(target=board.put, args=("job", 1, 4)).start()  # the engine thread
        await asyncio.wait_for(woke, 5)
        now[0] += 2.0
        board.put("job", 2, 4, b"jpeg")
        now[0] += 2.0
        board.put("job", 3, 4)
    latest = board.get("job")
    assert latest is not None and (latest.step, latest.steps, latest.preview) == (3, 4, b"jpeg")
    assert latest.fraction == 0.75 and latest.seconds_left() == pytest.approx(2.0)
    assert not board.wants_preview("job", 4)  # the listener left
    board.watch(BATCH, 5.0)  # a poller: previews for a while, then not
    assert board.wants_preview(BATCH, 4)
    now[0] += 6.0
    assert not board.wants_preview(BATCH, 4)
    board.drop("job")
    assert board.get("job") is None


# -- a job's events ----------------------------------------------------------------------------


async def test_job_events_arrive_in_order_with_previews_and_resume_after_last_event_id(
    tiny: DiffusionEngine,
) -> None:
    engine = Held(tiny)
    async with in_process(engine, preview_every=2, max_wait_ms=0) as app:  # type: ignore[arg-type]
        job = (await app.client.post("/v1/jobs", json=BODY)).json()["id"]
        stream = asyncio.ensure_future(app.client.get(f"/v1/jobs/{job}/events"))
        await eventually(lambda: app.service.progress._listeners.get(job, 0) > 0)
        engine.gate.set()
        answer = await asyncio.wait_for(stream, 60)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        events = parse(answer.text)
        names = [name for _, name, _ in events]
        assert names[0] in ("queued", "started") and names[-1] == "succeeded", names
        assert "started" in names and "progress" in names
        ids = [i for i, _, _ in events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        steps = [data["step"] for _, name, data in events if name == "progress"]
        assert steps == sorted(steps) and all(1 <= s <= 4 for s in steps)
        final = events[-1][2]
        assert final["status"] == "succeeded" and final["result"]["seed"] == 3
        previews = [d["preview"] for _, n, d in events if n == "progress" and "preview" in d]
        for preview in previews:  # made at steps 2 and 4: a JPEG of the 8x8 latent grid
            head, _, data = preview.partition(",")
            assert head == "data:image/jpeg;base64"
            assert Image.open(io.BytesIO(base64.b64decode(data))).size == (8, 8)

        first_progress = next(i for i, n, _ in events if n == "progress")
        resumed = await app.client.get(f"/v1/jobs/{job}/events",
                                       headers={"Last-Event-ID": str(first_progress)})
        again = parse(resumed.text)
        assert [n for _, n, _ in again] == ["succeeded"] and again[0][0] == ENDED
        done = await app.client.get(f"/v1/jobs/{job}/events",
                                    headers={"Last-Event-ID": str(ENDED)})
        assert parse(done.text) == []
        missing = await app.client.get("/v1/jobs/job_0123456789abcdef0123/events")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_a_job_in_progress_streams_its_step_and_a_preview(tiny: DiffusionEngine) -> None:
    engine = Held(tiny, hold_at=2)
    engine.gate.set()
    async with in_process(engine, preview_every=2, max_wait_ms=0) as app:  # type: ignore[arg-type]
        job = (await app.client.post("/v1/jobs", json=BODY)).json()["id"]
        events = JobEvents(app.service.jobs, app.service.progress, job, "http://t").events()
        try:
            seen: list[tuple[str, dict[str, Any]]] = []
            while not seen or seen[-1][0] != "progress" or seen[-1][1]["step"] < 2:
                event = await asyncio.wait_for(anext(events), 30)
                seen.append((event["event"], orjson.loads(event["data"])))
            assert seen[-1][1]["fraction"] == 0.5 and "preview" in seen[-1][1]
            engine.resume.set()
            while seen[-1][0] != "succeeded":
                event = await asyncio.wait_for(anext(events), 30)
                seen.append((event["event"], orjson.loads(event["data"])))
        finally:
            engine.resume.set()
            await events.aclose()


# -- A1111 ----------------------------------------------------------------------------------


async def test_a1111_progress_moves_from_0_to_1_with_the_running_image(
    tiny: DiffusionEngine,
) -> None:
    engine = Held(tiny, hold_at=2)
    async with in_process(engine, preview_every=2, max_wait_ms=0) as app:  # type: ignore[arg-type]
        idle = (await app.client.get("/sdapi/v1/progress")).json()
        assert idle["progress"] == 0 and idle["current_image"] is None
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "seed": 3}
        call = asyncio.ensure_future(app.client.post("/sdapi/v1/txt2img", json=body))
        await eventually(lambda: app.service.batcher.depth == 0 and app.service.running)
        engine.gate.set()
        await asyncio.to_thread(engine.reached.wait, 30)
        half = (await app.client.get("/sdapi/v1/progress")).json()
        assert half["progress"] == 0.5
        assert (half["state"]["sampling_step"], half["state"]["sampling_steps"]) == (2, 4)
        # previews are made once someone polls: the next due step (4) brings one
        engine.resume.set()
        answer = await asyncio.wait_for(call, 60)
        assert answer.status_code == 200
        after = (await app.client.get("/sdapi/v1/progress")).json()
        assert after["progress"] == 0 and after["state"]["sampling_steps"] == 0  # batch ended


async def test_a1111_progress_shows_the_preview_of_a_polled_batch(tiny: DiffusionEngine) -> None:
    engine = Held(tiny, hold_at=2)
    async with in_process(engine, preview_every=2, max_wait_ms=0) as app:  # type: ignore[arg-type]
        await app.client.get("/sdapi/v1/progress")  # a poller is watching from the start
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "seed": 3}
        call = asyncio.ensure_future(app.client.post("/sdapi/v1/txt2img", json=body))
        engine.gate.set()
        await asyncio.to_thread(engine.reached.wait, 30)
        half = (await app.client.get("/sdapi/v1/progress")).json()
        engine.resume.set()
        assert (await asyncio.wait_for(call, 60)).status_code == 200
    assert half["current_image"] is not None
    assert Image.open(io.BytesIO(base64.b64decode(half["current_image"]))).size == (8, 8)


# -- api + worker over Redis ---------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with redis_server(tmp_path_factory.mktemp("redis-progress")) as server:
        yield server.url


async def test_an_api_process_streams_the_steps_a_worker_runs_over_redis(
    tiny: DiffusionEngine, redis_url: str,
) -> None:
    engine = Held(tiny, hold_at=2)
    engine.gate.set()
    store = MemoryResultStore(ttl_s=600)
    shared = {"queue": redis_url, "results": "file:///nonexistent"}

    def queue() -> RedisQueue:
        return RedisQueue(redis_url, ttl_s=600, visibility_timeout_s=60, prefix="progress-test")

    async with AsyncExitStack() as stack:
        api = await stack.enter_async_context(in_process(
            role="api", backends={"queue": queue(), "store": store}, **shared))
        await stack.enter_async_context(in_process(
            engine, role="worker", max_wait_ms=0, preview_every=2,  # type: ignore[arg-type]
            backends={"queue": queue(), "store": store}, **shared))
        job = (await api.client.post("/v1/jobs", json=BODY)).json()["id"]
        events = JobEvents(api.service.jobs, api.service.progress, job, "http://t",
                           poll_s=0.05).events()
        try:
            seen = []
            while not seen or seen[-1][0] != "progress":
                event = await asyncio.wait_for(anext(events), 30)
                seen.append((event["event"], orjson.loads(event["data"])))
            assert api.service.engine is None  # the step came from the worker, over Redis
            assert 1 <= seen[-1][1]["step"] <= 2 and seen[-1][1]["steps"] == 4
            engine.resume.set()
            while seen[-1][0] != "succeeded":
                event = await asyncio.wait_for(anext(events), 30)
                seen.append((event["event"], orjson.loads(event["data"])))
            assert int(event["id"]) == ENDED and PROGRESS < ENDED
        finally:
            engine.resume.set()
            await events.aclose()


# -- a reader that stops reading -------------------------------------------------------------


def test_a_client_that_stops_reading_its_events_holds_nothing_up(tmp_path: Any) -> None:
    with running_server("--model", "tiny", "--max-wait-ms", "0", "--warmup", "64x64x1",
                        tmp_path=tmp_path) as server:
        jobs = [httpx.post(f"{server.url}/v1/jobs", json={**BODY, "seed": s}, timeout=30)
                .json()["id"] for s in range(3)]
        stuck = []
        for job in jobs:  # each opens its stream and never reads a byte of it
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.sendall(f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            stuck.append(sock)
        try:
            answer = httpx.post(f"{server.url}/t2i", json=BODY, timeout=120)
            assert answer.status_code == 200
            waited = httpx.post(f"{server.url}/v1/jobs", json=BODY, timeout=120,
                                headers={"Prefer": "wait=60"})
            assert waited.status_code == 200 and waited.json()["status"] == "succeeded"
        finally:
            for sock in stuck:
                sock.close()
