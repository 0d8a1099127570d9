"""Images in, by door, against an in-process service with a fake engine: each door (`/t2i`, jobs,
A1111 img2img, OpenAI edits) turns what its clients send into the one request, and the engine
receives the item with its decoded init image, mask, strength and start step; every bad input is
a clear error in the door's own shape with nothing queued or generated; bodies that carry images
get their own size limit. (The engine that starts items from the image comes with the model
families' step core; the lead adds the real-image assertions then.)"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from inprocess import InProcess, in_process
from PIL import Image
from webuiapi.webuiapi import b64_img

from batchserve import images, schema
from batchserve.engines import GenerationItem
from batchserve.engines.capabilities import ALL_IMAGE_INPUTS, IMG2IMG
from batchserve.jobs.service import input_name
from batchserve.jobs.stores import FileResultStore
from batchserve.service import shape_label

from fakes import FakeStepEngine
from imagedata import b64, encode, gradient, lying_png, mask, noise, png

JSON = {"content-type": "application/json"}
PICTURE = gradient(80, 64)
PICTURE_PNG = encode(PICTURE)
MASK = mask(80, 64, (8, 8, 40, 40))
LIMITS = {"max_body_bytes": 4096, "max_image_bytes": 256 * 1024}


@pytest.fixture
async def app() -> AsyncIterator[InProcess]:
    async with in_process(image_inputs=ALL_IMAGE_INPUTS, max_wait_ms=0, **LIMITS) as env:
        yield env


def only_item(env: InProcess) -> GenerationItem:
    (batch,) = env.engine.batches
    (item,) = batch
    return item


def stretched(image: Image.Image, width: int, height: int) -> bytes:
    return image.resize((width, height), Image.Resampling.LANCZOS).tobytes()


def openai_mask(painted: Image.Image) -> bytes:
    """OpenAI's mask for `painted` (white = repaint): transparent where it is white."""
    out = Image.new("RGBA", painted.size, (0, 0, 0, 255))
    out.putalpha(Image.eval(painted, lambda v: 255 - v))
    return encode(out)


# -- what each door hands the engine -----------------------------------------------------------


async def test_t2i_img2img_and_inpainting_reach_the_engine_decoded(app: InProcess) -> None:
    answer = await app.client.post("/t2i", json={
        "prompt": "a red barn", "init_image": f"data:image/png;base64,{b64(PICTURE_PNG)}",
        "strength": 0.5, "inference_steps": 4, "seed": 3})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png" and answer.headers["x-seed"] == "3"
    item = only_item(app)
    assert (item.width, item.height, item.seed) == (80, 64, 3)  # the image's own size
    assert item.init is not None and item.init.rgb == PICTURE.tobytes()
    assert (item.init.strength, item.start_step, item.init.mask) == (0.5, 2, None)
    assert item.key == (80, 64, 4, 7.5, "dpm++2m-karras", 2)
    app.engine.batches.clear()
    answer = await app.client.post("/t2i", json={
        "prompt": "a red barn", "init_image": b64(PICTURE_PNG), "mask_image": b64(encode(MASK)),
        "mask_blur": 0, "width": 64, "height": 64, "inference_steps": 4})
    assert answer.status_code == 200, answer.text
    item = only_item(app)
    assert item.init is not None and item.init.mask == stretched(MASK, 64, 64)
    assert item.init.rgb == stretched(PICTURE, 64, 64) and item.init.strength == 0.75


async def test_images_are_decoded_off_the_event_loop(
    app: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[str] = []
    real = images.decode

    def spy(*args: Any, **kwargs: Any) -> images.Decoded:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(schema.images, "decode", spy)
    answer = await app.client.post("/t2i", json={
        "prompt": "x", "init_image": b64(PICTURE_PNG), "inference_steps": 2})
    assert answer.status_code == 200
    assert len(threads) == 1 and threads[0].startswith("decode")


async def test_openai_client_images_edit(app: InProcess) -> None:
    transport = httpx.ASGITransport(app=app.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http, \
            openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused",
                               http_client=http, max_retries=0) as client:
        result = await client.images.edit(
            image=("photo.png", PICTURE_PNG, "image/png"), mask=openai_mask(MASK),
            prompt="a blue barn", n=2, size="64x64",  # type: ignore[arg-type]
            response_format="b64_json", model="dall-e-2",
            extra_body={"strength": 0.6, "num_inference_steps": 5, "seed": 7, "mask_blur": 0})
    assert result.data is not None and [d.b64_json is not None for d in result.data] == [True] * 2
    (batch,) = app.engine.batches
    assert [i.seed for i in batch] == [7, 8] and {i.prompt for i in batch} == {"a blue barn"}
    init = batch[0].init
    assert init is not None and batch[1].init is init  # n images share one decoded input
    assert (init.width, init.height, init.strength, batch[0].start_step) == (64, 64, 0.6, 2)
    assert init.rgb == stretched(PICTURE, 64, 64)
    assert init.mask == stretched(MASK, 64, 64)  # transparent -> white, as our masks say


async def test_openai_edit_without_a_mask_uses_the_images_transparency(app: InProcess) -> None:
    holes = PICTURE.convert("RGBA")
    holes.paste((0, 0, 0, 0), (0, 0, 16, 16))
    files = {"image": ("holes.png", encode(holes), "image/png")}
    answer = await app.client.post("/v1/images/edits", files=files, data={
        "prompt": "fill the corner", "num_inference_steps": "2", "output_format": "webp"})
    assert answer.status_code == 200, answer.text
    item = only_item(app)
    assert item.init is not None and item.init.mask is not None
    assert (item.width, item.height) == (80, 64)  # no size: the image's own
    painted = Image.frombytes("L", (80, 64), item.init.mask)
    assert painted.getpixel((2, 2)) > 200 and painted.getpixel((60, 50)) == 0
    assert item.init.rgb == images.to_rgb(holes).tobytes()  # transparency flattened on white
    data = orjson.loads(answer.content)["data"][0]
    assert base64.b64decode(data["b64_json"])[8:12] == b"WEBP"


async def test_a1111_img2img_as_webuiapi_sends_it(app: InProcess) -> None:
    # The body webuiapi 0.9 builds for img2img(images=[...], mask_image=..., ...).
    body = {"init_images": [b64_img(PICTURE)], "resize_mode": 0, "denoising_strength": 0.4,
            "mask_blur": 2, "inpainting_fill": 1, "inpaint_full_res": False,
            "inpaint_full_res_padding": 0, "inpainting_mask_invert": 1,
            "initial_noise_multiplier": 1, "prompt": "a barn", "styles": [], "seed": 11,
            "subseed": -1, "subseed_strength": 0, "seed_resize_from_h": 0,
            "seed_resize_from_w": 0, "batch_size": 2, "n_iter": 1, "steps": 5, "cfg_scale": 6.0,
            "image_cfg_scale": 1.5, "width": 64, "height": 96, "restore_faces": False,
            "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
            "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
            "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True,
            "sampler_name": "Euler a", "scheduler": "Automatic", "sampler_index": "Euler a",
            "include_init_images": False, "script_name": None, "script_args": [],
            "send_images": True, "save_images": False, "alwayson_scripts": {},
            "mask": b64_img(MASK)}
    answer = await app.client.post("/sdapi/v1/img2img", json=body)
    assert answer.status_code == 200, answer.text
    (batch,) = app.engine.batches
    assert [i.seed for i in batch] == [11, 12] and batch[0].sampler == "euler-a"
    init = batch[0].init
    assert init is not None and (init.width, init.height, init.strength) == (64, 96, 0.4)
    assert batch[0].start_step == 5 - int(5 * 0.4) and batch[0].guidance_scale == 6.0
    inverted = Image.eval(MASK, lambda v: 255 - v).resize((64, 96), Image.Resampling.LANCZOS)
    assert init.mask == inverted.filter(images.ImageFilter.GaussianBlur(2)).tobytes()
    out = orjson.loads(answer.content)
    assert len(out["images"]) == 2
    assert out["parameters"]["init_images"] is None and out["parameters"]["mask"] is None
    info = orjson.loads(out["info"])
    assert info["denoising_strength"] == 0.4 and "Denoising strength: 0.4" in info["infotexts"][0]
    body.update(include_init_images=True, mask=None, batch_size=1)
    echoed = orjson.loads((await app.client.post("/sdapi/v1/img2img", json=body)).content)
    assert echoed["parameters"]["init_images"] == body["init_images"]


async def test_a1111_img2img_without_width_and_height_is_the_familys_size_not_the_image(
    app: InProcess
) -> None:
    answer = await app.client.post("/sdapi/v1/img2img", json={
        "init_images": [b64(PICTURE_PNG)], "prompt": "x", "steps": 2})
    assert answer.status_code == 200, answer.text
    item = only_item(app)
    assert (item.width, item.height) == (512, 512) and item.init is not None


# -- jobs --------------------------------------------------------------------------------------


async def test_a_job_keeps_its_pixels_beside_its_record_until_it_ends(app: InProcess) -> None:
    app.engine.gate = threading.Event()
    answer = await app.client.post("/v1/jobs", json={
        "prompt": "x", "init_image": b64(PICTURE_PNG), "mask_image": b64(encode(MASK)),
        "strength": 0.5, "inference_steps": 2})
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]
    store, queue = app.service.jobs.store, app.service.jobs.queue
    record = await queue.get(job_id)
    assert record is not None and len(record.dumps()) < 2000  # no megabytes of base64
    assert record.request["init_image"] == {"width": 80, "height": 64}
    assert record.request["strength"] == 0.5 and record.request["mask_blur"] == 4
    stored = await store.get(input_name(job_id))
    assert stored is not None and len(stored) == 80 * 64 * 4
    viewed = (await app.client.get(f"/v1/jobs/{job_id}")).json()
    assert viewed["request"]["init_image"] == {"width": 80, "height": 64}
    app.engine.gate.set()
    done = await app.service.jobs.wait(job_id, 10)
    assert str(done.status) == "succeeded"
    item = only_item(app)
    assert item.init is not None and item.init.rgb == PICTURE.tobytes()
    assert item.init.mask is not None and item.start_step == 1
    assert await store.get(input_name(job_id)) is None  # deleted when the job ended
    assert await store.get(job_id) is not None  # the result stays


async def test_a_canceled_or_deduplicated_job_leaves_no_input_behind(app: InProcess) -> None:
    app.engine.gate = threading.Event()  # the first job holds the engine
    store = app.service.jobs.store
    body = {"prompt": "x", "init_image": b64(PICTURE_PNG), "inference_steps": 2}
    first = (await app.client.post("/v1/jobs", json=body)).json()["id"]
    queued = (await app.client.post("/v1/jobs", json=body,
                                     headers={"Idempotency-Key": "k1"})).json()["id"]
    again = (await app.client.post("/v1/jobs", json=body,
                                    headers={"Idempotency-Key": "k1"})).json()["id"]
    assert again == queued
    assert set(store._data) == {input_name(first), input_name(queued)}  # type: ignore[attr-defined]
    canceled = await app.client.delete(f"/v1/jobs/{queued}")
    assert canceled.json()["status"] == "canceled"
    assert await store.get(input_name(queued)) is None
    app.engine.gate.set()
    await app.service.jobs.wait(first, 10)
    assert not [k for k in store._data if k.endswith("-input")]  # type: ignore[attr-defined]


# -- bad input, by door: a clear error in the door's shape, nothing queued -----------------------


@dataclass(frozen=True)
class Door:
    """How one door sends (init, mask, strength) and names the fields in its errors."""

    name: str
    send: Callable[[httpx.AsyncClient, dict[str, Any]], Any]
    init: str
    mask: str
    strength: str

    def error(self, answer: httpx.Response) -> tuple[str, str | None]:
        """(message, field) from the door's own error shape."""
        body = answer.json()
        if self.name == "a1111":
            assert set(body) == {"error", "detail", "body", "errors"}
            return body["detail"], None
        if self.name == "openai":
            assert set(body["error"]) == {"message", "type", "param", "code"}
            return body["error"]["message"], body["error"]["param"]
        assert set(body["error"]) == {"code", "message", "field"}
        return body["error"]["message"], body["error"]["field"]


def _ours(path: str) -> Callable[[httpx.AsyncClient, dict[str, Any]], Any]:
    def send(client: httpx.AsyncClient, case: dict[str, Any]) -> Any:
        body: dict[str, Any] = {"prompt": "x", "inference_steps": 2, "width": 64, "height": 64}
        for ours in ("init_image", "mask_image", "strength"):
            if ours in case:
                body[ours] = case[ours]
        return client.post(path, content=orjson.dumps(body), headers=JSON)
    return send


def _a1111(client: httpx.AsyncClient, case: dict[str, Any]) -> Any:
    body: dict[str, Any] = {"prompt": "x", "steps": 2, "width": 64, "height": 64,
                            "inpainting_fill": 1, "inpaint_full_res": False}
    if "init_image" in case:
        body["init_images"] = [case["init_image"]]
    if "mask_image" in case:
        body["mask"] = case["mask_image"]
    if "strength" in case:
        body["denoising_strength"] = case["strength"]
    return client.post("/sdapi/v1/img2img", content=orjson.dumps(body), headers=JSON)


def multipart(parts: list[tuple[str, str | bytes]]) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body whatever its parts (httpx sends a form without files
    url-encoded): bytes are file parts, strings text parts."""
    boundary = "batchserve-test-boundary"
    out = b""
    for name, value in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
        if isinstance(value, bytes):
            head += f'; filename="{name}.png"\r\nContent-Type: image/png'
        out += (head + "\r\n\r\n").encode() + (
            value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, {"content-type": f"multipart/form-data; boundary={boundary}"}


def _openai(client: httpx.AsyncClient, case: dict[str, Any]) -> Any:
    parts: list[tuple[str, str | bytes]] = [("prompt", "x"), ("size", "64x64"),
                                            ("num_inference_steps", "2")]
    for ours, theirs in (("init_image", "image"), ("mask_image", "mask")):
        value = case.get(f"{ours}_bytes", case.get(ours))
        if value is not None:
            parts.append((theirs, value))  # a text part is read as base64, like JSON
    if "strength" in case:
        parts.append(("strength", str(case["strength"])))
    body, headers = multipart(parts)
    return client.post("/v1/images/edits", content=body, headers=headers)


DOORS = [
    Door("t2i", _ours("/t2i"), "init_image", "mask_image", "strength"),
    Door("jobs", _ours("/v1/jobs"), "init_image", "mask_image", "strength"),
    Door("a1111", _a1111, "init_images", "mask", "denoising_strength"),
    Door("openai", _openai, "image", "mask", "strength"),
]
GOOD = b64(png(64, 64))
ALPHA_MASK_32 = openai_mask(mask(64, 32, (0, 0, 8, 8)))
BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # id, the case in our names (a `*_bytes` key: what a multipart door uploads), field, says
    ("not-base64", {"init_image": "%%% not base64 %%%"}, "init", "not valid base64"),
    ("not-an-image", {"init_image": b64(b"just some text"), "init_image_bytes": b"just text"},
     "init", "not a PNG, JPEG or WebP image"),
    ("gif", {"init_image": b64(encode(gradient(8, 8), "GIF")),
             "init_image_bytes": encode(gradient(8, 8), "GIF")}, "init", "a GIF image"),
    ("bmp", {"init_image": b64(encode(gradient(8, 8), "BMP")),
             "init_image_bytes": encode(gradient(8, 8), "BMP")}, "init", "a BMP image"),
    ("tiff", {"init_image": b64(encode(gradient(8, 8), "TIFF")),
              "init_image_bytes": encode(gradient(8, 8), "TIFF")}, "init", "a TIFF image"),
    ("svg", {"init_image": b64(b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
             "init_image_bytes": b"<svg xmlns='http://www.w3.org/2000/svg'/>"}, "init",
     "an SVG image"),
    ("over-max-input-pixels", {"init_image": b64(lying_png(5000, 5000)),
                               "init_image_bytes": lying_png(5000, 5000)}, "init",
     "5000x5000 = 25000000 pixels"),
    ("truncated", {"init_image": b64(png(64, 64)[:-40]), "init_image_bytes": png(64, 64)[:-40]},
     "init", "not a readable PNG image"),
    ("mask-of-another-size", {"init_image": GOOD, "init_image_bytes": png(64, 64),
                              "mask_image": b64(encode(mask(64, 32, (0, 0, 8, 8)))),
                              "mask_image_bytes": ALPHA_MASK_32}, "mask", "64x32 but"),
    # ours names the mask ("mask_image needs an init_image"); A1111 and OpenAI the missing image
    ("mask-without-init", {"mask_image": GOOD, "mask_image_bytes": ALPHA_MASK_32}, "either",
     ""),
    ("strength-zero", {"init_image": GOOD, "init_image_bytes": png(64, 64), "strength": 0},
     "strength", "greater than 0"),
    ("strength-over-1", {"init_image": GOOD, "init_image_bytes": png(64, 64), "strength": 1.5},
     "strength", "greater than 0"),
]


async def _refused(env: InProcess, door: Door, case: dict[str, Any], status: int = 422
                   ) -> tuple[str, str | None]:
    rejected = env.metric("batchserve_requests_rejected_total", reason="invalid")
    answer = await door.send(env.client, case)
    assert answer.status_code == status, answer.text
    assert env.service.batcher.depth == 0 and env.engine.batches == []  # nothing queued
    assert await env.service.jobs.queue.waiting() == 0  # nor stored as a job
    assert env.metric("batchserve_requests_rejected_total", reason="invalid") == rejected + 1
    return door.error(answer)


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.name)
@pytest.mark.parametrize(("case", "field", "says"), [c[1:] for c in BAD],
                         ids=[c[0] for c in BAD])
async def test_bad_images_are_refused_in_the_doors_shape(
    app: InProcess, door: Door, case: dict[str, Any], field: str, says: str
) -> None:
    message, named = await _refused(app, door, case)
    names = (door.init, door.mask) if field == "either" else (getattr(door, field),)
    assert named in (*names, None)  # A1111's shape names no field: the message does
    assert any(message.startswith(name) for name in names), message
    assert says in message, message


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.name)
async def test_inpainting_asked_of_a_model_that_cannot_is_refused(door: Door) -> None:
    async with in_process(image_inputs=frozenset({IMG2IMG}), max_wait_ms=0, **LIMITS) as env:
        message, _ = await _refused(env, door, {
            "init_image": GOOD, "init_image_bytes": png(64, 64),
            "mask_image": b64(encode(mask(64, 64, (0, 0, 8, 8)))),
            "mask_image_bytes": openai_mask(mask(64, 64, (0, 0, 8, 8)))})
        assert door.mask in message and "does not take inpainting" in message
    async with in_process(image_inputs=frozenset(), max_wait_ms=0, **LIMITS) as env:
        message, _ = await _refused(env, door, {"init_image": GOOD,
                                                "init_image_bytes": png(64, 64)})
        assert "does not take an init image" in message


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.name)
async def test_image_fields_on_a_family_without_image_items_are_refused(
        door: Door, tmp_path: Path) -> None:
    """A `generic` model without a diffusers img2img sibling (PixArt, read from its folder
    without loading it) advertises no image inputs, and every door refuses an init image or a
    mask for it at validation, in its own shape, before anything is queued."""
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtSigmaPipeline"}')
    async with in_process(model=str(tmp_path), max_wait_ms=0, **LIMITS) as env:
        assert (await env.client.get("/v1/info")).json()["image_inputs"] == []
        message, _ = await _refused(env, door, {"init_image": GOOD,
                                                "init_image_bytes": png(64, 64)})
        assert message.startswith(door.init) and "does not take an init image" in message
        message, _ = await _refused(env, door, {
            "init_image": GOOD, "init_image_bytes": png(64, 64),
            "mask_image": b64(encode(mask(64, 64, (0, 0, 8, 8)))),
            "mask_image_bytes": openai_mask(mask(64, 64, (0, 0, 8, 8)))})
        assert "does not take" in message


@pytest.mark.parametrize(("body", "field"), [
    ({"resize_mode": 1}, "resize_mode"),
    ({"resize_mode": 3}, "resize_mode"),
    ({"mask": GOOD, "inpainting_fill": 0}, "inpainting_fill"),
    ({"mask": GOOD, "inpainting_fill": None, "inpaint_full_res": None}, "inpainting_fill"),
    ({"mask": GOOD, "inpaint_full_res": True}, "inpaint_full_res"),
    ({"mask": GOOD, "mask_round": False}, "mask_round"),
    ({"mask": GOOD, "mask_blur": None, "mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_x"),
    ({"initial_noise_multiplier": 0.9}, "initial_noise_multiplier"),
    ({"init_images": [GOOD, GOOD]}, "init_images"),
    ({"init_images": []}, "init_images"),
    ({"init_images": GOOD}, "init_images"),
    ({"enable_hr": True}, "enable_hr"),
])
async def test_a1111_modes_not_served_are_refused_by_name(
    app: InProcess, body: dict[str, Any], field: str
) -> None:
    sent = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "init_images": [GOOD],
            "inpainting_fill": 1, "inpaint_full_res": False, **body}
    sent = {k: v for k, v in sent.items() if v is not None}
    rejected = app.metric("batchserve_requests_rejected_total", reason="invalid")
    answer = await app.client.post("/sdapi/v1/img2img", json=sent)
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail.startswith(f"{field}") or field in detail
    assert app.engine.batches == [] and app.service.batcher.depth == 0
    assert app.metric("batchserve_requests_rejected_total", reason="invalid") == rejected + 1


IMAGE_PART = ("image", png(64, 64))


@pytest.mark.parametrize(("parts", "field"), [
    ([IMAGE_PART, ("stream", "true")], "stream"),
    ([IMAGE_PART, ("background", "transparent")], "background"),
    ([IMAGE_PART, ("output_format", "gif")], "output_format"),
    ([IMAGE_PART, ("size", "64")], "size"),
    ([IMAGE_PART, ("n", "11")], "n"),
    ([IMAGE_PART, ("quality", "hd"), ("styles", "x")], "styles"),
    ([("image[]", png(64, 64)), ("image[]", png(64, 64))], "image"),
    ([IMAGE_PART, ("prompt", b"a file")], "prompt"),
    ([IMAGE_PART, ("num_inference_steps", "3")], "num_inference_steps"),
    ([], "image"),
])
async def test_openai_edit_fields_not_served_are_refused_by_name(
    app: InProcess, parts: list[tuple[str, str | bytes]], field: str
) -> None:
    body, headers = multipart([("prompt", "x"), ("num_inference_steps", "2"), *parts])
    answer = await app.client.post("/v1/images/edits", content=body, headers=headers)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == field
    assert app.engine.batches == [] and app.service.batcher.depth == 0


# -- body limits -------------------------------------------------------------------------------


async def test_a_text_body_keeps_the_text_limit_and_an_image_body_gets_its_own(
    app: InProcess
) -> None:
    big_text = {"prompt": "x", "negative_prompt": "y" * 1999, "width": 64, "height": 64,
                "inference_steps": 2, "sampler": "euler", "priority": 0, "seed": 1,
                "guidance_scale": 7.0, "timeout_s": 30}
    padded = orjson.dumps(big_text)[:-1] + b" " * 5000 + b"}"  # valid JSON, 7 KB, no image
    for path in ("/t2i", "/v1/jobs", "/sdapi/v1/img2img", "/sdapi/v1/txt2img",
                 "/v1/images/generations"):
        answer = await app.client.post(path, content=padded, headers=JSON)
        assert answer.status_code == 413, (path, answer.text)
    assert "only a body that carries an image" in (await app.client.post(
        "/t2i", content=padded, headers=JSON)).json()["error"]["message"]
    photo = encode(noise(64, 64))
    assert 4096 < len(b64(photo)) < 256 * 1024
    answer = await app.client.post("/t2i", json={"prompt": "x", "init_image": b64(photo),
                                                 "inference_steps": 2})
    assert answer.status_code == 200, answer.text
    huge = b64(encode(noise(300, 300)))
    assert len(huge) > 256 * 1024
    for path in ("/t2i", "/v1/jobs"):
        answer = await app.client.post(path, json={"prompt": "x", "init_image": huge})
        assert answer.status_code == 413, answer.text
        assert "--max-image-bytes" in answer.json()["error"]["message"]
    answer = await app.client.post("/sdapi/v1/img2img", json={"prompt": "x",
                                                               "init_images": [huge]})
    assert answer.status_code == 413 and "--max-image-bytes" in answer.json()["detail"]
    answer = await app.client.post("/v1/images/edits", data={"prompt": "x"},
                                   files={"image": ("big.png", huge.encode(), "image/png")})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "body_too_large"
    assert len(app.engine.batches) == 1 and app.service.batcher.depth == 0  # the good one only


async def test_edits_want_multipart_and_bounded_parts(app: InProcess) -> None:
    answer = await app.client.post("/v1/images/edits", json={"prompt": "x"})
    assert answer.status_code == 415
    assert answer.json()["error"]["type"] == "invalid_request_error"
    broken = await app.client.post("/v1/images/edits", content=b"--x\r\nnot a part",
                                   headers={"content-type": "multipart/form-data; boundary=x"})
    assert broken.status_code in (400, 422), broken.text
    many = [(f"f{i}", (f"{i}.png", b"x", "image/png")) for i in range(6)]
    answer = await app.client.post("/v1/images/edits", data={"prompt": "x"}, files=many)
    assert answer.status_code == 400 and "Too many files" in answer.json()["error"]["message"]


async def test_openapi_documents_the_image_routes_and_fields(app: InProcess) -> None:
    spec = (await app.client.get("/openapi.json")).json()
    body = spec["components"]["schemas"]["T2IRequest"]["properties"]
    assert {"init_image", "strength", "mask_image", "mask_blur"} <= set(body)
    edits = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert edits["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
    img2img = spec["paths"]["/sdapi/v1/img2img"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]
    assert img2img["denoising_strength"]["exclusiveMinimum"] == 0
    assert img2img["resize_mode"]["const"] == 0 and img2img["inpainting_fill"]["const"] == 1
    jobs = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    assert "init_image" in jobs["schema"]["properties"]
    info = (await app.client.get("/v1/info")).json()
    assert info["image_inputs"] == ["img2img", "inpaint"]
    assert info["limits"]["max_image_bytes"] == 256 * 1024
    assert info["limits"]["max_input_pixels"] == 4096 * 4096


# -- batching: the start step joins the whole-batch key, not the continuous one ----------------


async def test_whole_batches_group_image_items_by_their_start_step() -> None:
    async with in_process(image_inputs=ALL_IMAGE_INPUTS, max_wait_ms=60_000,
                          max_batch_size=2, **LIMITS) as env:
        def body(seed: int, strength: float | None) -> dict[str, Any]:
            out: dict[str, Any] = {"prompt": "x", "seed": seed, "inference_steps": 4,
                                   "width": 64, "height": 64}
            if strength is not None:
                out.update(init_image=GOOD, strength=strength)
            return out

        # text (step 0) + strength 1 (step 0); two at strength 0.5 (step 2): two full batches
        answers = await asyncio.gather(*(
            env.client.post("/t2i", json=body(seed, strength))
            for seed, strength in ((1, None), (2, 0.5), (3, 1.0), (4, 0.5))))
        assert [a.status_code for a in answers] == [200] * 4
        batches = sorted(sorted(i.seed for i in batch) for batch in env.engine.batches)
        assert batches == [[1, 3], [2, 4]]
        labels = {a.headers["x-seed"]: a for a in answers}
        assert labels["2"].headers["x-batch-size"] == "2"
    assert shape_label((64, 64, 4, 7.5, "euler", 2)) == "64x64x4x7.5@2/euler"
    assert shape_label((64, 64, 4, 7.5, "euler")) == "64x64x4x7.5/euler"


async def test_under_continuous_image_items_share_the_running_batch_of_their_size() -> None:
    engine = FakeStepEngine(gate=threading.Event())
    async with in_process(engine, image_inputs=ALL_IMAGE_INPUTS, flush_policy="continuous",
                          max_wait_ms=0, **LIMITS) as env:
        text = asyncio.ensure_future(env.client.post("/t2i", json={
            "prompt": "x", "seed": 1, "inference_steps": 3, "width": 64, "height": 64}))
        await asyncio.to_thread(engine.started.wait, 10)  # the text item is stepping
        queued = asyncio.Event()
        submit = env.service.batcher.submit

        def noting(*args: Any, **kwargs: Any) -> Any:
            future = submit(*args, **kwargs)
            queued.set()
            return future

        env.service.batcher.submit = noting  # type: ignore[method-assign]
        edit = asyncio.ensure_future(env.client.post("/t2i", json={
            "prompt": "x", "seed": 2, "inference_steps": 3, "init_image": GOOD,
            "strength": 0.7}))
        await asyncio.wait_for(queued.wait(), 10)  # queued while the first step is held
        engine.gate.set()
        assert (await text).status_code == 200 and (await edit).status_code == 200
    assert any(step == [1, 2] for step in engine.steps)  # one forward pass, both items


async def test_a_file_result_store_keeps_and_deletes_a_jobs_input(tmp_path: Path) -> None:
    store = FileResultStore(tmp_path / "results", ttl_s=3600)
    async with in_process(image_inputs=ALL_IMAGE_INPUTS, max_wait_ms=0,
                          backends={"store": store}, **LIMITS) as env:
        env.engine.gate = threading.Event()  # held: the job stays queued or running
        sent = await env.client.post("/v1/jobs", json={
            "prompt": "x", "init_image": GOOD, "inference_steps": 2})
        job_id = sent.json()["id"]
        assert (tmp_path / "results" / input_name(job_id)).stat().st_size == 64 * 64 * 3
        env.engine.gate.set()
        assert str((await env.service.jobs.wait(job_id, 10)).status) == "succeeded"
        assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [job_id]
