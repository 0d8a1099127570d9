"""The OpenAI and A1111 doors in process (FakeEngine): translation onto the one request, refusals
and each door's error shape; and every door sharing one batch under one API key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from inprocess import InProcess, in_process
from PIL import Image

from batchserve.api.a1111 import sampler_for
from batchserve.engines import GenerationItem
from batchserve.errors import ValidationError
from batchserve.jobs.memory import MemoryQueue, MemoryResultStore

from fakes import FakeEngine

KEY = "doors-test-key"
BEARER = {"authorization": f"Bearer {KEY}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size  # type: ignore[no-any-return]


def items(app: InProcess) -> list[GenerationItem]:
    return [item for batch in app.engine.batches for item in batch]


# -- OpenAI ----------------------------------------------------------------------------------

async def test_openai_n_images_with_consecutive_seeds_in_one_batch() -> None:
    async with in_process(max_batch_size=3, max_wait_ms=60_000) as app:
        response = await app.client.post("/v1/images/generations", json={
            "prompt": "a red cube", "n": 3, "size": "128x64", "seed": 40, "model": "dall-e-2",
            "quality": "standard", "style": "vivid", "user": "u1", "num_inference_steps": 2,
            "guidance_scale": 3.0, "negative_prompt": "blur", "response_format": "b64_json",
        })
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [png_size(d["b64_json"]) for d in data] == [(128, 64)] * 3
        assert [d["seed"] for d in data] == [40, 41, 42]
        # the n images enter the queue together: one group, flushed because it is full
        (batch,) = app.engine.batches
        assert [(i.seed, i.width, i.height, i.inference_steps, i.guidance_scale,
                 i.negative_prompt) for i in batch] == [
            (s, 128, 64, 2, 3.0, "blur") for s in (40, 41, 42)]


OPENAI_BAD = [
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "4096x4096"}, "size"),
    ({"prompt": "x", "size": "100x64"}, "size"),
    ({"prompt": "x", "response_format": "gif"}, "response_format"),
    ({"prompt": ""}, "prompt"),
    ({"n": 1}, "prompt"),
    ({"prompt": "x", "steps": 3}, "steps"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "model": 3}, "model"),
]


@pytest.mark.parametrize(("body", "param"), OPENAI_BAD)
async def test_openai_bad_input_in_openai_error_shape(body: dict[str, Any], param: str) -> None:
    async with in_process() as app:
        response = await app.client.post("/v1/images/generations", json=body)
        assert response.status_code == 422
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["param"], error["type"], error["code"]) == (
            param, "invalid_request_error", "validation_error")
        assert error["message"]
        assert app.engine.batches == []


async def test_openai_url_format_answers_job_image_urls_once_generated() -> None:
    async with in_process(api_key=KEY, max_batch_size=2, max_wait_ms=60_000) as app:
        response = await app.client.post("/v1/images/generations", headers=BEARER, json={
            "prompt": "x", "n": 2, "size": "64x128", "seed": 9, "response_format": "url"})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["seed"] for d in data] == [9, 10]
        for item in data:
            assert "/v1/jobs/" in item["url"] and item["url"].endswith("/image")
            image = await app.client.get(item["url"], headers=BEARER)
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert Image.open(io.BytesIO(image.content)).size == (64, 128)
        (batch,) = app.engine.batches  # the two jobs shared one batch
        assert [i.seed for i in batch] == [9, 10]


async def test_openai_auth_and_malformed_json_keep_openai_shape_and_status() -> None:
    async with in_process(api_key=KEY) as app:
        denied = await app.client.post("/v1/images/generations", json={"prompt": "x"})
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        broken = await app.client.post("/v1/images/generations", content=b"{",
                                       headers={**BEARER, "content-type": "application/json"})
        assert broken.status_code == 400 and broken.json()["error"]["code"] == "malformed_json"
        models = await app.client.get("/v1/models", headers=BEARER)
        assert models.json()["data"][0]["id"] == "fake"


async def test_openai_queue_full_is_429_and_queues_none_of_the_n() -> None:
    async with in_process(max_queue=2, max_wait_ms=60_000, max_batch_size=8,
                          refusal_hold_s=0) as app:
        response = await app.client.post("/v1/images/generations",
                                         json={"prompt": "x", "n": 3, "size": "64x64"})
        assert response.status_code == 429 and "Retry-After" in response.headers
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert app.service.batcher.depth == 0


# -- A1111 -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "scheduler", "ours"), [
    ("Euler a", None, "euler-a"),
    ("Euler a", "Automatic", "euler-a"),
    ("euler a", "uniform", "euler-a"),
    ("DPM++ 2M", "Karras", "dpm++2m-karras"),
    ("DPM++ 2M", "automatic", "dpm++2m-karras"),
    ("DPM++ 2M", "Uniform", "dpm++2m"),
    ("DPM++ 2M Karras", None, "dpm++2m-karras"),
    ("DDIM", "normal", "ddim"),
    ("UniPC", None, "unipc"),
    ("Heun", None, "heun"),
    ("heun", None, "heun"),
    (None, None, "ddim"),
    ("", "karras", "ddim"),
])
def test_a1111_sampler_mapping(name: str | None, scheduler: str | None, ours: str) -> None:
    assert sampler_for(name, scheduler, default="ddim") == ours


@pytest.mark.parametrize(("name", "scheduler", "field"), [
    ("DPM++ SDE", None, "sampler_name"),
    ("Euler a", "Karras", "scheduler"),
    ("Euler", "exponential", "scheduler"),
])
def test_a1111_unknown_samplers_list_the_served_ones(name: str, scheduler: str | None,
                                                     field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        sampler_for(name, scheduler, default="ddim")
    assert caught.value.field == field
    if field == "sampler_name":
        assert "Euler a" in caught.value.message and "DPM++ 2M" in caught.value.message


A1111_GOOD = {"prompt": "a red cube", "negative_prompt": "blur", "seed": 7, "steps": 2,
              "cfg_scale": 5, "width": 64, "height": 128, "sampler_name": "Euler a",
              "scheduler": "Automatic", "batch_size": 2, "n_iter": 2}


async def test_a1111_batch_size_times_n_iter_all_queued_at_once() -> None:
    async with in_process(max_batch_size=4, max_wait_ms=60_000) as app:
        response = await app.client.post("/sdapi/v1/txt2img", json={
            **A1111_GOOD, "url": "http://x", "auth": "", "styles": [], "alwayson_scripts": {},
            "override_settings": {"CLIP_stop_at_last_layers": 1}, "enable_hr": False,
            "denoising_strength": 0.7, "hr_scale": 2, "eta": 1.0, "s_noise": 1,
            "send_images": True, "save_images": True, "something_new": {"x": 1},
        })
        assert response.status_code == 200, response.text
        body = response.json()
        assert [png_size(i) for i in body["images"]] == [(64, 128)] * 4
        info = orjson.loads(body["info"])
        assert info["all_seeds"] == [7, 8, 9, 10] and info["seed"] == 7
        assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (
            64, 128, 2, 5.0)
        assert info["sampler_name"] == "Euler a" and info["batchserve_sampler"] == "euler-a"
        assert body["parameters"]["steps"] == 2 and "auth" not in body["parameters"]
        (batch,) = app.engine.batches  # 4 images, one group, one full batch
        assert {(i.sampler, i.guidance_scale, i.negative_prompt) for i in batch} == {
            ("euler-a", 5.0, "blur")}


async def test_a1111_clip_skip_is_the_servers() -> None:
    async with in_process(clip_skip=2, max_wait_ms=0) as app:
        body = {"prompt": "x", "width": 64, "height": 64}
        same = await app.client.post("/sdapi/v1/txt2img", json={
            **body, "override_settings": {"CLIP_stop_at_last_layers": 2}})
        assert same.status_code == 200
        assert orjson.loads(same.json()["info"])["clip_skip"] == 2
        other = await app.client.post("/sdapi/v1/txt2img", json={
            **body, "override_settings": {"CLIP_stop_at_last_layers": 1}})
        assert other.status_code == 422 and "--clip-skip 2" in other.json()["detail"]
        options = (await app.client.get("/sdapi/v1/options")).json()
        assert options["CLIP_stop_at_last_layers"] == 2


async def test_a1111_seed_minus_one_is_random_and_send_images_false() -> None:
    async with in_process(max_wait_ms=0) as app:
        response = await app.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "seed": -1, "width": 64, "height": 64, "send_images": False})
        assert response.status_code == 200
        body = response.json()
        assert body["images"] == [] and orjson.loads(body["info"])["seed"] >= 0


A1111_BAD = [
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"tiling": True}, "tiling"),
    ({"init_images": ["aGk="]}, "init_images"),
    ({"alwayson_scripts": {"controlnet": {"args": []}}}, "alwayson_scripts"),
    ({"alwayson_scripts": 5}, "alwayson_scripts"),  # was a 500 (iterating an int)
    ({"alwayson_scripts": True}, "alwayson_scripts"),
    ({"alwayson_scripts": ["controlnet"]}, "alwayson_scripts"),
    ({"override_settings": [1]}, "override_settings"),
    ({"styles": 5}, "styles"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"override_settings": {"sd_model_checkpoint": "other.safetensors"}}, "override_settings"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, "override_settings"),  # server: 1
    ({"sampler_name": "LMS"}, "sampler_name"),
    ({"steps": 0}, "steps"),
    ({"cfg_scale": 31}, "cfg_scale"),
    ({"width": 65}, "width"),
    ({"seed": -2}, "seed"),
    ({"batch_size": 17}, "batch_size"),
    ({"batch_size": 8, "n_iter": 3}, "batch_size"),
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize(("extra", "field"), A1111_BAD)
async def test_a1111_refusals_in_a1111_error_shape(extra: dict[str, Any], field: str) -> None:
    async with in_process() as app:
        response = await app.client.post("/sdapi/v1/txt2img", json={**A1111_GOOD, **extra})
        assert response.status_code == 422, response.text
        body = response.json()
        assert set(body) == {"error", "detail", "body", "errors"}
        assert body["error"] == "ValidationError" and field in body["detail"]
        assert app.engine.batches == [] and app.service.batcher.depth == 0


async def test_a1111_listing_routes_and_options() -> None:
    async with in_process(api_key=KEY) as app:
        auth = basic("anyone", KEY)
        assert (await app.client.get("/sdapi/v1/sd-models")).status_code == 401
        assert (await app.client.get("/sdapi/v1/sd-models", headers=basic("u", "wrong"))
                ).status_code == 401
        models = (await app.client.get("/sdapi/v1/sd-models", headers=auth)).json()
        assert models[0]["title"] == "fake"
        samplers = (await app.client.get("/sdapi/v1/samplers", headers=BEARER)).json()
        assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
        schedulers = (await app.client.get("/sdapi/v1/schedulers", headers=auth)).json()
        assert {"automatic", "karras"} <= {s["name"] for s in schedulers}
        options = (await app.client.get("/sdapi/v1/options", headers=auth)).json()
        assert options["sd_model_checkpoint"] == "fake"
        same = await app.client.post("/sdapi/v1/options", headers=auth, json=options)
        assert same.status_code == 200
        other = await app.client.post("/sdapi/v1/options", headers=auth,
                                      json={"sd_model_checkpoint": "sdxl"})
        assert other.status_code == 422 and "sdxl" in other.json()["detail"]
        progress = (await app.client.get("/sdapi/v1/progress", headers=auth)).json()
        assert progress["progress"] == 0.0 and progress["state"]["job_count"] == 0
        interrupt = await app.client.post("/sdapi/v1/interrupt", headers=auth)
        assert interrupt.status_code == 200


async def test_a1111_progress_counts_queued_and_running_work() -> None:
    import threading

    from fakes import FakeEngine

    engine = FakeEngine(gate=threading.Event())
    async with in_process(engine, max_batch_size=1, max_wait_ms=0) as app:
        body = {"prompt": "x", "width": 64, "height": 64}
        first = asyncio.create_task(app.client.post("/sdapi/v1/txt2img", json=body))
        await asyncio.to_thread(engine.started.wait, 10)
        second = asyncio.create_task(app.client.post("/sdapi/v1/txt2img", json=body))
        for _ in range(10_000):  # yield until the second request reached the queue
            if app.service.batcher.depth:
                break
            await asyncio.sleep(0)
        progress = (await app.client.get("/sdapi/v1/progress")).json()
        assert progress["state"]["job_count"] == 2
        assert engine.gate is not None
        engine.gate.set()
        assert [(await t).status_code for t in (first, second)] == [200, 200]


# -- every door, one key, one batch ------------------------------------------------------------

async def test_requests_from_every_door_with_one_key_share_a_batch() -> None:
    async with in_process(api_key=KEY, max_batch_size=3, max_wait_ms=60_000) as app:
        client = app.client
        common = {"prompt": "one key", "seed": 1}
        calls = [
            client.post("/t2i", headers=BEARER, json={
                **common, "width": 64, "height": 64, "inference_steps": 2,
                "guidance_scale": 7.5, "sampler": "euler-a"}),
            client.post("/v1/images/generations", headers=BEARER, json={
                **common, "size": "64x64", "num_inference_steps": 2, "guidance_scale": 7.5,
                "sampler": "euler-a"}),
            client.post("/sdapi/v1/txt2img", headers=basic("me", KEY), json={
                **common, "width": 64, "height": 64, "steps": 2, "cfg_scale": 7.5,
                "sampler_name": "Euler a"}),
        ]
        responses = await asyncio.gather(*calls)
        assert [r.status_code for r in responses] == [200, 200, 200]
        (batch,) = app.engine.batches  # flushed because full: one batch of all three doors
        assert len(batch) == 3 and len({i.key for i in batch}) == 1
        assert responses[0].headers["X-Batch-Size"] == "3"
        doors = {"t2i", "openai", "a1111"}
        for door in doors:  # the http_* metrics tell the doors apart by route
            assert app.metric("http_requests_total", handler=_route(door), method="POST",
                              status="2xx") == 1


def _route(door: str) -> str:
    return {"t2i": "/t2i", "openai": "/v1/images/generations", "a1111": "/sdapi/v1/txt2img"}[door]


async def test_request_log_names_the_door(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="batchserve.access")
    async with in_process(max_wait_ms=0) as app:
        await app.client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
        await app.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64,
                                                         "height": 64, "steps": 0})
    records = [r.fields for r in caplog.records if hasattr(r, "fields")]
    assert [(r["door"], r["status"]) for r in records] == [("openai", 200), ("a1111", 422)]
    assert records[0]["key"].endswith("/dpm++2m-karras")


# -- a --role api process (no model) bridges OpenAI and A1111 over the jobs queue ---------------

@contextlib.asynccontextmanager
async def api_and_worker(engine: FakeEngine) -> AsyncIterator[tuple[InProcess, InProcess]]:
    """An api and a worker service sharing one in-memory queue and store (the settings name
    shared backends, as split roles must; the injected memory ones stand in for them)."""
    backends = {"queue": MemoryQueue(ttl_s=3600, visibility_timeout_s=120),
                "store": MemoryResultStore(ttl_s=3600)}
    shared = {"queue": "redis://127.0.0.1:1/0", "results": "file:///nonexistent"}
    async with contextlib.AsyncExitStack() as stack:
        api = await stack.enter_async_context(in_process(FakeEngine(), role="api",
                                                         backends=backends, **shared))
        worker = await stack.enter_async_context(in_process(
            engine, role="worker", max_wait_ms=60_000, max_batch_size=2, backends=backends,
            **shared))
        yield api, worker


async def test_api_role_serves_openai_and_a1111_through_the_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="batchserve.access")
    async with api_and_worker(FakeEngine()) as (api, worker):
        oai, sd = await asyncio.gather(
            api.client.post("/v1/images/generations", json={
                "prompt": "x", "size": "64x64", "seed": 3}),
            api.client.post("/sdapi/v1/txt2img", json={
                "prompt": "x", "width": 64, "height": 64, "seed": 4,
                "sampler_name": "DPM++ 2M", "scheduler": "Karras"}),
        )
        assert (oai.status_code, sd.status_code) == (200, 200), (oai.text, sd.text)
        assert png_size(oai.json()["data"][0]["b64_json"]) == (64, 64)
        assert png_size(sd.json()["images"][0]) == (64, 64)
        (batch,) = worker.engine.batches  # both doors' jobs shared the worker's batch
        assert sorted(i.seed for i in batch) == [3, 4] and api.engine.batches == []
        logged = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("jobs")]
        assert {r["door"] for r in logged} == {"openai", "a1111"}
        for job in (job for r in logged for job in r["jobs"]):
            assert await api.service.jobs.store.get(job) is None  # read back, then deleted
        t2i = await api.client.post("/t2i", json={"prompt": "x", "width": 64, "height": 64})
        assert t2i.status_code == 503 and t2i.json()["error"]["code"] == "not_served_here"
