"""End to end: a real uvicorn subprocess serving the tiny model on a loopback port."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import httpx
import numpy as np
from PIL import Image

from conftest import ServerProcess

SMALL = {"width": 64, "height": 64, "inference_steps": 4, "guidance_scale": 7.5}


def post(server: ServerProcess, **fields: Any) -> httpx.Response:
    return httpx.post(server.url + "/t2i", json={"prompt": "a red cube", **fields}, timeout=120)


async def post_many(server: ServerProcess, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        return list(await asyncio.gather(*(client.post("/t2i", json=b) for b in bodies)))


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)


def test_png_of_the_asked_size(tiny_server: ServerProcess) -> None:
    r = post(tiny_server, width=128, height=64, inference_steps=2, seed=1)
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.format == "PNG" and image.size == (128, 64)
    assert r.headers["x-seed"] == "1"
    assert float(r.headers["x-inference-ms"]) > 0 and float(r.headers["x-queue-ms"]) >= 0
    assert len(r.headers["x-request-id"]) >= 8


def test_jpeg_and_webp_by_field_or_accept(tiny_server: ServerProcess) -> None:
    bodies = [dict(SMALL, prompt="f", seed=1, format="jpeg"), dict(SMALL, prompt="f", seed=2)]
    jpeg, _ = asyncio.run(post_many(tiny_server, bodies))
    assert jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    webp = httpx.post(tiny_server.url + "/t2i", json=dict(SMALL, prompt="w", seed=3),
                      headers={"accept": "image/webp"}, timeout=120)
    assert webp.headers["content-type"] == "image/webp"
    assert Image.open(io.BytesIO(webp.content)).format == "WEBP"


def test_eight_concurrent_same_key_requests_share_one_batch(tiny_server: ServerProcess) -> None:
    bodies = [dict(SMALL, prompt=f"cube {i}", seed=i) for i in range(8)]
    responses = asyncio.run(post_many(tiny_server, bodies))
    assert [r.status_code for r in responses] == [200] * 8
    assert {r.headers["x-batch-size"] for r in responses} == {"8"}
    assert len({r.headers["x-inference-ms"] for r in responses}) == 1  # one batch, one wall time


def test_two_keys_are_never_batched_together(tiny_server: ServerProcess) -> None:
    a = [dict(SMALL, prompt=f"a{i}", seed=i) for i in range(3)]
    b = [dict(SMALL, prompt=f"b{i}", seed=i, inference_steps=3) for i in range(3)]
    responses = asyncio.run(post_many(tiny_server, a + b))
    assert [r.status_code for r in responses] == [200] * 6
    assert {r.headers["x-batch-size"] for r in responses} == {"3"}
    inference = {r.headers["x-inference-ms"] for r in responses}
    assert len(inference) == 2  # two batches


def test_same_seed_same_image_alone_or_among_strangers(tiny_server: ServerProcess) -> None:
    mine = dict(SMALL, prompt="a lighthouse at dusk", negative_prompt="fog", seed=1234)
    alone = post(tiny_server, **mine)
    assert alone.headers["x-batch-size"] == "1"
    strangers = [dict(SMALL, prompt=f"stranger {i}", seed=9000 + i) for i in range(7)]
    together = asyncio.run(post_many(tiny_server, [*strangers[:3], mine, *strangers[3:]]))
    assert together[3].headers["x-batch-size"] == "8"
    difference = np.abs(pixels(alone) - pixels(together[3]))
    assert difference.max() <= 1, f"max uint8 difference {difference.max()}"


def test_different_seeds_give_different_images(tiny_server: ServerProcess) -> None:
    bodies = [dict(SMALL, prompt="same prompt", seed=s) for s in (1, 2)]
    one, two = asyncio.run(post_many(tiny_server, bodies))
    assert np.abs(pixels(one) - pixels(two)).mean() > 1.0


def test_health_ready_and_info(tiny_server: ServerProcess) -> None:
    assert httpx.get(tiny_server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(tiny_server.url + "/readyz").status_code == 200
    info = httpx.get(tiny_server.url + "/v1/info").json()
    assert info["engine"]["model"] == "tiny" and info["engine"]["demo_model"] is True
    assert info["engine"]["vae_scale_factor"] == 8
    assert info["engine"]["tuning"]["channels_last"] == {
        "enabled": False, "detail": "needs CUDA; off on this machine"}
    assert info["batching"]["max_batch_size"] == 8


def test_startup_log_warns_about_the_demo_model(tiny_server: ServerProcess) -> None:
    logs = tiny_server.logs()
    assert "RANDOM-WEIGHT demo model" in logs and "--model PATH_OR_HUB_ID" in logs
    assert "tuning channels_last: off (needs CUDA" in logs
