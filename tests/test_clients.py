"""Each door end to end on a real tiny-model server with the client people use: the official
`openai` package, PyPI's `webuiapi`, and the exact bodies Open WebUI and SillyTavern send."""

from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest
import webuiapi
from PIL import Image

from conftest import ServerProcess, running_server
from imagedata import encode, gradient, mask

PROMPT = "a lighthouse at dusk"


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


@contextlib.contextmanager
def oai(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@contextlib.contextmanager
def webui(server: ServerProcess, **defaults: Any) -> Iterator[webuiapi.WebUIApi]:
    api = webuiapi.WebUIApi(baseurl=server.url + "/sdapi/v1", **defaults)
    try:
        yield api
    finally:
        api.session.close()


def test_openai_client_generates_n_images(tiny_server: ServerProcess) -> None:
    with oai(tiny_server) as client:
        result = client.images.generate(
            prompt=PROMPT, n=2, size="64x64",  # type: ignore[arg-type]  # any WxH is served
            response_format="b64_json", model="dall-e-2",
            extra_body={"num_inference_steps": 1, "seed": 3},
        )
    assert result.data is not None and len(result.data) == 2
    images = [decode_png(base64.b64decode(d.b64_json or "")) for d in result.data]
    assert [im.shape for im in images] == [(64, 64, 3)] * 2
    assert not np.array_equal(images[0], images[1])  # seeds 3 and 4


def test_openai_client_url_format_points_at_job_images(tiny_server: ServerProcess) -> None:
    with oai(tiny_server) as client:
        result = client.images.generate(
            prompt=PROMPT, size="64x64",  # type: ignore[arg-type]
            response_format="url", extra_body={"num_inference_steps": 1, "seed": 4},
        )
    assert result.data is not None and result.data[0].url is not None
    image = httpx.get(result.data[0].url)
    assert image.status_code == 200 and decode_png(image.content).shape == (64, 64, 3)


def test_openai_client_sees_errors_as_openai_errors(tiny_server: ServerProcess) -> None:
    with oai(tiny_server) as client, pytest.raises(openai.UnprocessableEntityError) as caught:
        client.images.generate(prompt=PROMPT, n=11)
    assert caught.value.status_code == 422
    body: Any = caught.value.body
    assert body["param"] == "n" and body["type"] == "invalid_request_error"
    with oai(tiny_server) as client:
        models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_webuiapi_client_txt2img_and_listings(tiny_server: ServerProcess) -> None:
    with webui(tiny_server, sampler="Euler a", steps=1) as api:
        result = api.txt2img(prompt=PROMPT, seed=5, width=64, height=64, batch_size=2,
                             cfg_scale=7)
        assert [im.size for im in result.images] == [(64, 64)] * 2
        assert result.info["all_seeds"] == [5, 6]
        assert result.info["batchserve_sampler"] == "euler-a"
        assert api.util_get_model_names() == ["tiny"]
        assert "Euler a" in api.util_get_sampler_names()
        assert "karras" in api.util_get_scheduler_names()
        assert api.util_get_current_model() == "tiny"
        assert api.get_progress()["state"]["job_count"] == 0
        with pytest.raises(RuntimeError) as caught:  # webuiapi raises (status, text)
            api.txt2img(prompt=PROMPT, width=64, height=64, enable_hr=True)
    status, text = caught.value.args
    assert status == 422 and "enable_hr" in orjson.loads(text)["detail"]


# Open WebUI, backend/open_webui/routers/images.py (image_generations, engine "automatic1111"):
# it posts {"prompt", "batch_size": n, "width", "height"} plus "steps", "negative_prompt",
# "cfg_scale", "sampler_name", "scheduler" when configured, with an `authorization` header that
# is "" when no AUTOMATIC1111_API_AUTH is set; before that it GETs /sdapi/v1/options for
# "sd_model_checkpoint" and POSTs the whole options dict back to change model.
OPEN_WEBUI_BODY = {"prompt": PROMPT, "batch_size": 1, "width": 64, "height": 64, "steps": 1,
                   "negative_prompt": "", "cfg_scale": 7.0, "sampler_name": "Euler a",
                   "scheduler": "Automatic"}
# SillyTavern, public/scripts/extensions/stable-diffusion/index.js (generateAutoImage, source
# "auto") with its default settings (sampler DDIM, scheduler normal, seed -1 -> omitted); its
# server (src/endpoints/stable-diffusion.js, POST /generate) forwards the whole body, `url` and
# `auth` included, to /sdapi/v1/txt2img with `Authorization: Basic base64(auth)`.
SILLYTAVERN_BODY = {
    "url": "http://localhost:7860", "auth": "", "prompt": PROMPT, "negative_prompt": "blurry",
    "sampler_name": "DDIM", "scheduler": "normal", "steps": 1, "cfg_scale": 7, "width": 64,
    "height": 64, "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent",
    "hr_scale": 2.0, "denoising_strength": 0.7, "hr_second_pass_steps": 0,
    "override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards":
    True, "clip_skip": 1, "save_images": True, "send_images": True, "do_not_save_grid": False,
    "do_not_save_samples": False,
}


@pytest.mark.parametrize(("body", "headers"), [
    (OPEN_WEBUI_BODY, {"authorization": ""}),
    # getBasicAuthHeader("") is "Basic " (src/util.js); fetch trims the value to "Basic"
    (SILLYTAVERN_BODY, {"authorization": "Basic"}),
], ids=["open-webui", "sillytavern"])
def test_bodies_real_a1111_clients_send(tiny_server: ServerProcess, body: dict[str, Any],
                                        headers: dict[str, str]) -> None:
    options = httpx.get(tiny_server.url + "/sdapi/v1/options", headers=headers).json()
    assert options["sd_model_checkpoint"] == "tiny"
    reply = httpx.post(tiny_server.url + "/sdapi/v1/txt2img", json=body, headers=headers,
                       timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert decode_png(base64.b64decode(data["images"][0])).shape == (64, 64, 3)
    info = orjson.loads(data["info"])
    assert info["width"] == 64 and info["steps"] == 1
    if body is OPEN_WEBUI_BODY:  # Open WebUI posts the options back unchanged to pick a model
        set_model = httpx.post(tiny_server.url + "/sdapi/v1/options", json=options,
                               headers=headers)
        assert set_model.status_code == 200


def test_same_seed_same_image_through_t2i_openai_and_a1111(tiny_server: ServerProcess) -> None:
    url = tiny_server.url
    seed, steps = 11, 2

    def t2i() -> np.ndarray:
        reply = httpx.post(url + "/t2i", timeout=60, json={
            "prompt": PROMPT, "seed": seed, "width": 64, "height": 64, "inference_steps": steps,
            "guidance_scale": 7.5, "sampler": "euler-a"})
        assert reply.status_code == 200, reply.text
        return decode_png(reply.content)

    def via_openai() -> np.ndarray:
        with oai(tiny_server) as client:
            result = client.images.generate(
                prompt=PROMPT, size="64x64",  # type: ignore[arg-type]
                extra_body={"seed": seed, "sampler": "euler-a", "num_inference_steps": steps,
                            "guidance_scale": 7.5})
        assert result.data is not None
        return decode_png(base64.b64decode(result.data[0].b64_json or ""))

    def via_a1111() -> np.ndarray:
        with webui(tiny_server) as api:
            result = api.txt2img(prompt=PROMPT, seed=seed, width=64, height=64, steps=steps,
                                 cfg_scale=7.5, sampler_name="Euler a", scheduler="Automatic")
        return np.asarray(result.images[0].convert("RGB"), dtype=np.int16)

    with ThreadPoolExecutor(3) as pool:
        images = list(pool.map(lambda f: f(), [t2i, via_openai, via_a1111]))
    for other in images[1:]:  # equal after uint8 rounding; +-1 tolerated on CPU float32
        assert np.abs(images[0] - other).max() <= 1
    assert images[0].std() > 0  # an image, not a blank


# -- images in -------------------------------------------------------------------------------
# `--model sim` serves img2img as a no-op edit (it hands back the init image), so the first two
# show the clients' requests crossing the doors intact, pixel for pixel; against `tiny`, the
# real engine's edits.


@pytest.fixture(scope="module")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server("--model", "sim", "--max-wait-ms", "0",
                        tmp_path=tmp_path_factory.mktemp("sim_server")) as server:
        yield server


PICTURE = gradient(96, 80)


def stretched(width: int, height: int) -> np.ndarray:
    resized = PICTURE.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.int16)


def test_webuiapi_client_img2img_and_inpainting(sim_server: ServerProcess) -> None:
    with webui(sim_server, sampler="Euler a", steps=4) as api:
        result = api.img2img(images=[PICTURE], prompt=PROMPT, seed=5, width=64, height=72,
                             denoising_strength=0.5, batch_size=2)
        assert [im.size for im in result.images] == [(64, 72)] * 2
        assert np.array_equal(np.asarray(result.images[0].convert("RGB"), dtype=np.int16),
                              stretched(64, 72))
        assert result.info["all_seeds"] == [5, 6] and result.info["denoising_strength"] == 0.5
        inpainted = api.img2img(images=[PICTURE], mask_image=mask(96, 80, (0, 0, 30, 30)),
                                prompt=PROMPT, width=64, height=64, inpainting_fill=1,
                                inpaint_full_res=False, mask_blur=2)
        assert inpainted.images[0].size == (64, 64) and inpainted.info["mask_blur"] == 2
        with pytest.raises(RuntimeError) as caught:  # A1111's defaults: only masked, fill
            api.img2img(images=[PICTURE], mask_image=mask(96, 80, (0, 0, 30, 30)),
                        prompt=PROMPT, width=64, height=64)
    status, text = caught.value.args
    assert status == 422 and orjson.loads(text)["detail"].startswith("inpainting_fill")


def test_openai_client_images_edit(sim_server: ServerProcess) -> None:
    with oai(sim_server) as client:
        result = client.images.edit(
            image=("photo.png", encode(PICTURE), "image/png"), prompt=PROMPT, n=2,
            size="64x64",  # type: ignore[arg-type]
            extra_body={"strength": 0.5, "num_inference_steps": 4, "seed": 9})
        own = client.images.edit(image=("photo.png", encode(PICTURE), "image/png"),
                                 prompt=PROMPT, extra_body={"num_inference_steps": 2})
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.images.edit(image=("photo.gif", encode(PICTURE, "GIF"), "image/gif"),
                               prompt=PROMPT)
    assert result.data is not None and len(result.data) == 2
    edited = decode_png(base64.b64decode(result.data[0].b64_json or ""))
    assert np.array_equal(edited, stretched(64, 64))
    assert own.data is not None
    assert decode_png(base64.b64decode(own.data[0].b64_json or "")).shape == (80, 96, 3)
    body: Any = caught.value.body
    assert body["param"] == "image" and "a GIF image" in body["message"]


def test_tiny_edits_images_for_the_webuiapi_and_openai_clients(
        tiny_server: ServerProcess) -> None:
    """Against the real engine: img2img and inpainting (A1111's client) and an edit (OpenAI's)
    come back at the asked size, differ from the init image, and depend on it."""
    assert httpx.get(tiny_server.url + "/v1/info").json()["image_inputs"] == ["img2img",
                                                                              "inpaint"]
    with webui(tiny_server, sampler="Euler a", steps=4) as api:
        varied = api.img2img(images=[PICTURE], prompt=PROMPT, seed=5, width=64, height=72,
                             denoising_strength=0.5)
        inpainted = api.img2img(images=[PICTURE], mask_image=mask(96, 80, (0, 0, 40, 40)),
                                prompt=PROMPT, seed=5, width=64, height=72, inpainting_fill=1,
                                inpaint_full_res=False, mask_blur=2, denoising_strength=0.5)
    assert varied.image.size == inpainted.image.size == (64, 72)
    got = np.asarray(varied.image.convert("RGB"), dtype=np.int16)
    assert np.abs(got - stretched(64, 72)).max() > 10  # repainted, not handed back
    assert np.abs(got - np.asarray(inpainted.image.convert("RGB"), dtype=np.int16)).max() > 3
    with oai(tiny_server) as client:
        edits = [client.images.edit(
            image=("photo.png", encode(picture), "image/png"), prompt=PROMPT, size="72x64",  # type: ignore[arg-type]
            extra_body={"strength": 0.5, "num_inference_steps": 4, "seed": 9})
            for picture in (PICTURE, PICTURE.transpose(Image.Transpose.ROTATE_180))]
    shown = [decode_png(base64.b64decode(e.data[0].b64_json or "")) for e in edits if e.data]
    assert [im.shape for im in shown] == [(64, 72, 3)] * 2
    assert np.abs(shown[0] - shown[1]).max() > 3  # same seed, another picture
