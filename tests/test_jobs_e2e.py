"""Async jobs end to end on a real server with the tiny model (memory queue and store)."""

from __future__ import annotations

import asyncio
import io
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image

from conftest import ServerProcess

SMALL = {"width": 64, "height": 64, "inference_steps": 4, "guidance_scale": 7.5}


def pixels(content: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"), dtype=np.int16)


def test_submit_poll_fetch_and_same_image_as_t2i(tiny_server: ServerProcess) -> None:
    body = dict(SMALL, prompt="a lighthouse at dusk", seed=4321, width=96)
    with httpx.Client(base_url=tiny_server.url, timeout=120) as client:
        sync = client.post("/t2i", json=body)
        submitted = client.post("/v1/jobs", json=body)
        assert submitted.status_code == 202
        job = submitted.json()["id"]
        for _ in range(600):  # poll, as a client would
            view = client.get(f"/v1/jobs/{job}").json()
            if view["status"] not in ("queued", "running"):
                break
            time.sleep(0.1)  # polling an external process, bounded
        assert view["status"] == "succeeded", view
        assert (view["result"]["width"], view["result"]["height"]) == (96, 64)
        image = client.get(view["result"]["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (96, 64)
        difference = np.abs(pixels(image.content) - pixels(sync.content))
        assert difference.max() <= 1, f"max uint8 difference {difference.max()}"


async def _mixed(server: ServerProcess) -> tuple[list[httpx.Response], list[dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
        jobs = [client.post("/v1/jobs", json=dict(SMALL, prompt=f"job {i}", seed=i),
                            headers={"Prefer": "wait=60"}) for i in range(4)]
        syncs = [client.post("/t2i", json=dict(SMALL, prompt=f"sync {i}", seed=i))
                 for i in range(4)]
        responses = await asyncio.gather(*jobs, *syncs)
    return list(responses[4:]), [r.json() for r in responses[:4]]


def test_jobs_and_t2i_requests_share_a_batch(tiny_server: ServerProcess) -> None:
    syncs, jobs = asyncio.run(_mixed(tiny_server))
    assert [r.status_code for r in syncs] == [200] * 4
    assert {r.headers["x-batch-size"] for r in syncs} == {"8"}
    assert [j["status"] for j in jobs] == ["succeeded"] * 4
    assert {j["result"]["batch_size"] for j in jobs} == {8}
    inference = {r.headers["x-inference-ms"] for r in syncs}
    assert inference == {f"{j['result']['inference_ms']:.1f}" for j in jobs}  # one batch
