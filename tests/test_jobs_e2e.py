"""Async jobs end to end on a real server (memory queue and store): the tiny model for images,
the sim engine for the drain on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from conftest import ServerProcess, running_server

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


def _metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_sigterm_finishes_the_jobs_a_server_holds_and_answers_every_wait(
        tmp_path: Path) -> None:
    # Batches of 2 taking 1.5 s: the runner holds 4 jobs (two batches), 2 stay in the queue.
    with running_server("--model", "sim", "--sim-base-ms", "1500", "--max-batch-size", "2",
                        "--max-wait-ms", "0", tmp_path=tmp_path) as server, \
            ThreadPoolExecutor(6) as pool:
        def submit(seed: int) -> httpx.Response:
            return httpx.post(server.url + "/v1/jobs", json=dict(SMALL, prompt="p", seed=seed),
                              headers={"Prefer": "wait=60"}, timeout=60)

        waits = [pool.submit(submit, seed) for seed in range(6)]
        deadline = time.monotonic() + 15
        while not (_metric(server, "batchserve_jobs_total", status="queued") == 6
                   and _metric(server, "batchserve_jobs_waiting") == 2):
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.02)  # polling an external process, bounded by the deadline
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while httpx.get(server.url + "/readyz", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.02)
        refused = httpx.post(server.url + "/v1/jobs", json=dict(SMALL, prompt="late"), timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        answers = sorted((f.result().status_code, f.result().json()["status"]) for f in waits)
        assert answers == [(200, "succeeded")] * 4 + [(202, "queued")] * 2
        assert server.proc.wait(30) == 0
        assert "Traceback" not in server.logs()
