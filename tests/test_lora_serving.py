"""Per-request LoRA through the server: the `loras` field at every door, mixed batches that
equal each item alone, the folder found again without a restart, the adapter cache, and every
bad input answered in the door's shape with nothing queued.

The engine is the real `tiny` one (random weights, CPU); the LoRA files are written in the
layouts people download (`loras.py`).
"""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from inprocess import in_process
from loras import diffusers_format, kohya
from PIL import Image
from test_jobs import finished

from batchserve.engines import GenerationItem, LoraPick
from batchserve.engines import tiny as tiny_preset
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.settings import Settings

from conftest import running_server

BODY: dict[str, Any] = {"prompt": "a red cube on a table", "width": 64, "height": 64,
                        "inference_steps": 4, "seed": 5}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("served-loras")
    pipe = tiny_preset.build_pipeline()
    kohya(root / "ink.safetensors", pipe, seed=1)
    diffusers_format(root / "neon.safetensors", pipe, seed=2)
    kohya(root / "grain.safetensors", pipe, seed=3, rank=8, alpha=None, text=False)
    (root / "pickled.ckpt").write_bytes(b"not read: a pickle could run code")
    spare = tmp_path_factory.mktemp("spare-loras")
    kohya(spare / "late.safetensors", pipe, seed=4)
    return root


@pytest.fixture(scope="module")
def engine(folder: Path) -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup="", lora_dir=str(folder)))


def alone(engine: DiffusionEngine, seed: int, *loras: tuple[str, float]) -> np.ndarray:
    item = GenerationItem(BODY["prompt"], "", seed, 64, 64, 4, 7.5, engine.sampler,
                          loras=tuple(LoraPick(n, s) for n, s in loras))
    return np.asarray(engine.generate([item])[0], dtype=np.int16)


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def body(seed: int, *loras: tuple[str, float]) -> dict[str, Any]:
    out = {**BODY, "seed": seed}
    if loras:
        out["loras"] = [{"name": n, "scale": s} for n, s in loras]
    return out


MIX = [(11, ("ink", 0.8)), (12, ("neon", 1.0), ("grain", -0.5)), (13, ("grain", 1.5)), (14,)]


@pytest.mark.parametrize("policy", ["deadline", "continuous"])
async def test_a_mixed_batch_equals_each_item_alone(engine: DiffusionEngine, folder: Path,
                                                    policy: str) -> None:
    async with in_process(engine, lora_dir=str(folder), flush_policy=policy,  # type: ignore[arg-type]
                          max_batch_size=4, max_wait_ms=5000) as app:
        calls = [app.client.post("/t2i", json=body(seed, *picks))  # type: ignore[arg-type]
                 for seed, *picks in MIX]
        answers = await asyncio.gather(*calls)
    sizes = [int(a.headers["X-Batch-Size"]) for a in answers]
    # deadline: one batch of four LoRA sets; continuous: they join the running one as they come
    assert sizes == [4] * 4 if policy == "deadline" else max(sizes) >= 2, sizes
    for (seed, *picks), answer in zip(MIX, answers, strict=True):
        assert answer.status_code == 200, answer.text
        expected = alone(engine, seed, *picks)  # type: ignore[arg-type]
        assert np.abs(png(answer.content) - expected).max() <= 1, (policy, seed)
    plain = alone(engine, 11)
    assert np.abs(plain - alone(engine, 11, ("ink", 0.8))).max() > 10  # the LoRA mattered


async def test_bad_loras_are_refused_in_each_doors_shape_and_nothing_is_queued(
    engine: DiffusionEngine, folder: Path,
) -> None:
    async with in_process(engine, lora_dir=str(folder), max_loras_per_request=2) as app:
        before = len(engine.lora.resident) if engine.lora else 0  # type: ignore[union-attr]
        cases = [
            ([{"name": "nope"}], "loras[0].name", "GET /v1/loras"),
            ([{"name": "../ink"}], "loras[0].name", "not a path"),
            ([{"name": "ink", "scale": 5}], "loras[0].scale", "between -4 and 4"),
            ([{"name": "ink"}, {"name": "neon"}, {"name": "grain"}], "loras", "at most 2"),
            ([{"name": "pickled"}], "loras[0].name", "pickle"),
            ([{"name": "ink"}, {"name": "ink"}], "loras[1].name", "named twice"),
            ([{"name": "ink", "weight": 1}], "loras[0].weight", "unknown field"),
            ({"name": "ink"}, "loras", "a list"),
        ]
        for loras, field, words in cases:
            answer = await app.client.post("/t2i", json={**BODY, "loras": loras})
            assert answer.status_code == 422, (loras, answer.text)
            error = answer.json()["error"]
            assert error["field"] == field and words in error["message"], (loras, error)
        job = await app.client.post("/v1/jobs", json={**BODY, "loras": [{"name": "nope"}]})
        assert job.status_code == 422 and job.json()["error"]["field"] == "loras[0].name"
        a1111 = await app.client.post("/sdapi/v1/txt2img",
                                      json={"prompt": "a cube <lora:nope:0.5>", "steps": 4})
        assert a1111.status_code == 422 and "'nope'" in a1111.text
        assert "error" in a1111.json() and "detail" in a1111.json()  # A1111's own shape
        openai = await app.client.post("/v1/images/generations", json={
            "prompt": "x", "size": "64x64", "loras": [{"name": "ink", "scale": 9}]})
        assert openai.status_code == 422 and "loras[0].scale" in openai.text
        assert app.metric("batchserve_requests_admitted_total") == 0
        after = len(engine.lora.resident) if engine.lora else 0  # type: ignore[union-attr]
        assert after == before  # nothing was even read for them
    async with in_process() as plain:  # no --lora-dir
        answer = await plain.client.post("/t2i", json={**BODY, "loras": [{"name": "ink"}]})
        assert answer.status_code == 422 and "--lora-dir" in answer.text


async def test_a_file_added_later_is_served_without_a_restart_and_listed(
    engine: DiffusionEngine, folder: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    async with in_process(engine, lora_dir=str(folder), lora_rescan_s=3600) as app:
        listed = (await app.client.get("/v1/loras")).json()
        names = {e["name"]: e for e in listed["loras"]}
        assert names["ink"]["usable"] and not names["pickled"]["usable"]
        assert "pickle" in names["pickled"]["reason"] and "late" not in names
        a1111 = (await app.client.get("/sdapi/v1/loras")).json()
        assert {e["name"] for e in a1111} == {"ink", "neon", "grain"}
        assert all("/" not in e["path"] for e in a1111)  # file names, never server paths
        spare = next(p for p in folder.parent.iterdir() if p.name.startswith("spare-loras"))
        shutil.copy(spare / "late.safetensors", folder / "late.safetensors")
        try:
            # named at once, though the listing is not stale: an unknown name lists again
            answer = await app.client.post("/t2i", json=body(21, ("late", 1.0)))
            assert answer.status_code == 200, answer.text
            assert np.abs(png(answer.content) - alone(engine, 21)).max() > 10
            assert (await app.client.post("/sdapi/v1/refresh-loras")).status_code == 200
            assert "late" in {e["name"] for e in (await app.client.get("/sdapi/v1/loras")).json()}
            info = (await app.client.get("/v1/info")).json()["loras"]
            assert info["enabled"] and "late" in info["resident"]
        finally:
            (folder / "late.safetensors").unlink()
            engine.lora.library.refresh()  # type: ignore[union-attr]


async def test_eviction_and_reload_give_the_same_image(engine: DiffusionEngine,
                                                       folder: Path) -> None:
    async with in_process(engine, lora_dir=str(folder)) as app:
        runtime = engine.lora
        assert runtime is not None
        first = await app.client.post("/t2i", json=body(31, ("ink", 1.0)))
        one = runtime.resident[next(v for v, r in runtime.resident.items() if r.name == "ink")]
        runtime.cache_bytes = one.nbytes  # room for one adapter: the next one evicts it
        try:
            other = await app.client.post("/t2i", json=body(32, ("neon", 1.0)))
            assert "ink" not in runtime.resident_names()
            again = await app.client.post("/t2i", json=body(31, ("ink", 1.0)))
        finally:
            runtime.cache_bytes = 1 << 30
        assert first.status_code == other.status_code == again.status_code == 200
        assert np.array_equal(png(first.content), png(again.content))
        assert app.metric("batchserve_lora_evictions_total") >= 1
        assert app.metric("batchserve_lora_load_seconds_count") >= 1  # ink, read again


async def test_a_job_carries_its_loras(engine: DiffusionEngine, folder: Path) -> None:
    async with in_process(engine, lora_dir=str(folder)) as app:
        made = await app.client.post("/v1/jobs", json=body(41, ("neon", 0.6)))
        assert made.status_code == 202, made.text
        job = made.json()["id"]
        view = await finished(app, job)
        assert view["status"] == "succeeded", view
        assert view["request"]["loras"] == [{"name": "neon", "scale": 0.6}]
        image = await app.client.get(f"/v1/jobs/{job}/image")
        assert np.abs(png(image.content) - alone(engine, 41, ("neon", 0.6))).max() <= 1


def test_webuiapi_client_with_lora_prompt_syntax(folder: Path, tmp_path: Path) -> None:
    """A real server and A1111's Python client: `<lora:ink:0.7>` in the prompt is the same
    image as `loras: [{ink, 0.7}]` on our own door, and differs from no LoRA."""
    import webuiapi

    with running_server("--model", "tiny", "--lora-dir", str(folder), "--max-wait-ms", "1",
                        tmp_path=tmp_path) as server:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
        result = api.txt2img(prompt="a red cube on a table <lora:ink:0.7>", seed=51, steps=4,
                             width=64, height=64, cfg_scale=7.5, sampler_name="DPM++ 2M",
                             scheduler="Karras")
        tagged = np.asarray(result.image.convert("RGB"), dtype=np.int16)
        ours = httpx.post(f"{server.url}/t2i", json={**body(51, ("ink", 0.7))}, timeout=120)
        plain = httpx.post(f"{server.url}/t2i", json=body(51), timeout=120)
    assert ours.status_code == plain.status_code == 200
    assert np.abs(tagged - png(ours.content)).max() <= 1
    assert np.abs(tagged - png(plain.content)).max() > 10


def test_a1111_tags_leave_the_prompt_and_become_loras() -> None:
    from batchserve.api.a1111 import lora_tags

    assert lora_tags("a cat <lora:ink:0.7> in <LORA:neon> snow") == (
        "a cat in snow", [{"name": "ink", "scale": 0.7}, {"name": "neon", "scale": 1.0}])
    assert lora_tags("no tags here") == ("no tags here", [])
    with pytest.raises(Exception, match="text encoder"):
        lora_tags("<lora:ink:0.5:1.0>")
    with pytest.raises(Exception, match="must be a number"):
        lora_tags("<lora:ink:strong>")


@pytest.mark.parametrize(("batching", "sizes"), [("mixed", [3, 3, 3]), ("split", [1, 1, 1])])
async def test_lora_batching_split_keys_batches_by_lora_set(tmp_path: Path, batching: str,
                                                            sizes: list[int]) -> None:
    """`--lora-batching split` (the comparison arm of the sim benchmark) keeps requests with
    different LoRA sets apart; `mixed` (the default) lets them share one batch. The sim engine
    serves the names without weights."""
    from batchserve.engines.sim import SimEngine

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    engine = SimEngine(base_ms=1, per_image_ms=1)
    async with in_process(engine, lora_dir=str(tmp_path),  # type: ignore[arg-type]
                          lora_batching=batching, max_batch_size=3, max_wait_ms=2000) as app:
        answers = await asyncio.gather(*(
            app.client.post("/t2i", json={**BODY, "loras": [{"name": n}]})
            for n in ("a", "b", "c")))
    assert [a.status_code for a in answers] == [200] * 3
    assert [int(a.headers["X-Batch-Size"]) for a in answers] == sizes


async def test_a_link_out_of_the_folder_is_never_read(tmp_path: Path) -> None:
    """A request names a file, never a path; a link in --lora-dir whose target lies outside it
    is listed as unusable, and naming it is a 422 (nothing outside the folder is opened)."""
    from batchserve.engines.sim import SimEngine

    folder, outside = tmp_path / "loras", tmp_path / "private"
    folder.mkdir()
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"not for requests")
    (folder / "escape.safetensors").symlink_to(outside / "secret.safetensors")
    (folder / "fine.safetensors").write_bytes(b"")
    async with in_process(SimEngine(base_ms=1, per_image_ms=1),  # type: ignore[arg-type]
                          lora_dir=str(folder), max_wait_ms=0) as app:
        listed = {e["name"]: e for e in (await app.client.get("/v1/loras")).json()["loras"]}
        assert not listed["escape"]["usable"] and "outside" in listed["escape"]["reason"]
        answer = await app.client.post("/t2i", json={**BODY, "loras": [{"name": "escape"}]})
        assert answer.status_code == 422 and "outside --lora-dir" in answer.text
        assert answer.json()["error"]["field"] == "loras[0].name"
        fine = await app.client.post("/t2i", json={**BODY, "loras": [{"name": "fine"}]})
        assert fine.status_code == 200
