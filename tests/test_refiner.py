"""The SDXL refiner (`--refiner tiny-sdxl-refiner`): the hand-off equals diffusers' own
ensemble of experts (base `denoising_end`, refiner `denoising_start`) for the same seed, an item
is the same alone or among strangers, served under the whole-batch policies; bad input is a
clear error naming the flag or field, with nothing queued."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess import in_process
from PIL import Image
from test_stepwise import pixels, run_until_done

from batchserve.engines import GenerationItem
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.engines.families import check_start
from batchserve.schema import Limits, validate
from batchserve.settings import Settings, SettingsError

CAT = GenerationItem("a red cat", "", 1, 64, 64, 6, 7.5, refiner_switch=0.5)
DOG = GenerationItem("a blue dog", "blurry", 2, 64, 64, 5, 5.0, "euler-a", refiner_switch=0.6)


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny-sdxl", refiner="tiny-sdxl-refiner",
                                         warmup=""))


def diff(a: object, b: object) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def _diffusers_ensemble(engine: DiffusionEngine, item: GenerationItem) -> object:
    """diffusers' documented flow, on the prompt text: base to `denoising_end` as latents, the
    refiner from `denoising_start` on them, one generator through both."""
    scheduler = engine._scheduler_for(item)
    engine.pipe.scheduler = scheduler
    assert engine.refiner is not None
    engine.refiner.scheduler = engine._scheduler_for(item)
    generator = torch.Generator().manual_seed(item.seed)
    common = {"prompt": item.prompt, "negative_prompt": item.negative_prompt or None,
              "num_inference_steps": item.inference_steps,
              "guidance_scale": item.guidance_scale, "generator": generator}
    latents = engine.pipe(**common, width=item.width, height=item.height,
                          denoising_end=item.refiner_switch, output_type="latent").images
    image = engine.refiner(**common, image=latents,
                           denoising_start=item.refiner_switch).images[0]
    engine.sampler = ""  # the engine's sampler bookkeeping: rebuilt on the next batch
    return image


@pytest.mark.parametrize("item", [CAT, DOG], ids=["empty-negative", "negative-euler-a"])
def test_hand_off_equals_diffusers_base_plus_refiner(engine: DiffusionEngine,
                                                     item: GenerationItem) -> None:
    ours = engine.generate([item])[0]
    assert diff(ours, _diffusers_ensemble(engine, item)) <= 1
    # The refiner changed the image: the same item without it differs (random weights and a
    # few refiner steps: a small but certain difference).
    assert diff(ours, engine.generate([replace(item, refiner_switch=0.0)])[0]) > 2


def test_alone_equals_in_a_batch_of_strangers(engine: DiffusionEngine) -> None:
    stranger = GenerationItem("something else entirely", "ugly", 9, 64, 64, 6, 7.5,
                              refiner_switch=0.5)
    alone = engine.generate([CAT])[0]
    together = engine.generate([stranger, CAT])
    assert diff(alone, together[1]) <= 1
    assert diff(together[0], together[1]) > 10


def test_the_switch_joins_the_batching_key() -> None:
    plain = replace(CAT, refiner_switch=0.0)
    assert len({CAT.key, plain.key, replace(CAT, refiner_switch=0.7).key}) == 3
    assert plain.key == (64, 64, 6, 7.5, "")
    from batchserve.engines import key_label
    assert key_label(CAT.key) == "64x64x6x7.5+refiner@0.5"
    from batchserve.service import shape_label
    assert shape_label(DOG.key) == "64x64x5x5+refiner@0.6/euler-a"


@pytest.mark.parametrize("policy", ["deadline", "eager", "continuous"])
async def test_served_under_every_policy_equals_alone(engine: DiffusionEngine,
                                                              policy: str) -> None:
    items = (CAT, replace(CAT, prompt="another cat", seed=7), DOG)
    async with in_process(engine, flush_policy=policy,  # type: ignore[arg-type]
                          max_wait_ms=50, refiner="tiny-sdxl-refiner") as app:
        responses = await asyncio.gather(*(app.client.post("/t2i", json={
            "prompt": i.prompt, "negative_prompt": i.negative_prompt, "seed": i.seed,
            "width": i.width, "height": i.height, "inference_steps": i.inference_steps,
            "guidance_scale": i.guidance_scale, "refiner_switch": i.refiner_switch,
            **({"sampler": i.sampler} if i.sampler else {}),
        }) for i in items))
    for item, response in zip(items, responses, strict=True):
        assert response.status_code == 200, response.text
        served = Image.open(io.BytesIO(response.content)).convert("RGB")
        assert diff(served, engine.generate([item])[0]) <= 1


def test_info_names_the_refiner(engine: DiffusionEngine) -> None:
    assert engine.info().to_dict()["refiner"] == "tiny-sdxl-refiner"


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "half", True])
def test_switch_out_of_range_names_the_field(value: object) -> None:
    with pytest.raises(Exception, match="refiner_switch") as err:
        validate({"prompt": "x", "refiner_switch": value}, Limits(refiner=True))
    assert getattr(err.value, "field", None) == "refiner_switch"


def test_switch_without_a_refiner_names_the_flag() -> None:
    with pytest.raises(Exception, match=r"refiner_switch: .*--refiner"):
        validate({"prompt": "x", "refiner_switch": 0.8}, Limits())
    request = validate({"prompt": "x", "refiner_switch": 0.8}, Limits(refiner=True))
    assert request.item().refiner_switch == 0.8


async def test_switch_without_a_refiner_is_422_and_nothing_queued() -> None:
    async with in_process() as app:
        response = await app.client.post("/t2i", json={"prompt": "x", "refiner_switch": 0.8})
        assert response.status_code == 422
        assert "--refiner" in response.text
        assert app.engine.batches == []


def test_a_refiner_without_an_sdxl_base_names_the_flag() -> None:
    with pytest.raises(SettingsError, match=r"^--refiner: .*SDXL base.*tiny is sd1"):
        DiffusionEngine.load(Settings(model="tiny", refiner="tiny-sdxl-refiner", warmup=""))


@pytest.mark.parametrize("item", [CAT, DOG, replace(CAT, sampler="heun", refiner_switch=0.4)],
                         ids=["dpm++", "euler-a", "heun"])
def test_the_step_core_hand_off_equals_the_whole_batch(engine: DiffusionEngine,
                                                       item: GenerationItem) -> None:
    """One step core: the item's state moves to the refiner at its hand-off step, with the
    refiner's own scheduler, timesteps and rows, as the two pipelines run it."""
    whole = pixels(engine.generate([item])[0])
    stepped = run_until_done(engine, engine.prepare([item]))
    assert np.abs(stepped[item] - whole).max() <= 1


def test_joining_a_running_batch_part_way_equals_alone(engine: DiffusionEngine) -> None:
    """Base-stage and refiner-stage items share steps (one forward per stage); items without
    a refiner run beside them."""
    plain = GenerationItem("a lamp", "", 3, 64, 64, 4, 1.0)
    late = replace(DOG, seed=11, refiner_switch=0.3)
    alone = {item: pixels(engine.generate([item])[0]) for item in (CAT, plain, late)}
    joined = run_until_done(engine, engine.prepare([CAT]), [plain, late], join_after=3)
    for item, image in alone.items():
        assert np.abs(joined[item] - image).max() <= 1, item


async def test_doors_list_the_refiner_and_a1111_maps_its_fields(engine: DiffusionEngine) -> None:
    async with in_process(engine, refiner="tiny-sdxl-refiner", max_wait_ms=1) as app:
        models = (await app.client.get("/v1/models")).json()["data"]
        assert [m["id"] for m in models] == ["fake", "tiny-sdxl-refiner"]
        listed = (await app.client.get("/sdapi/v1/sd-models")).json()
        assert [m["title"] for m in listed] == ["fake", "tiny-sdxl-refiner"]
        info = (await app.client.get("/v1/info")).json()
        assert "tiny-sdxl-refiner" in str(info)
        body = {"prompt": CAT.prompt, "seed": CAT.seed, "width": 64, "height": 64,
                "steps": CAT.inference_steps, "cfg_scale": CAT.guidance_scale,
                "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                "refiner_checkpoint": "tiny-sdxl-refiner [abc123]", "refiner_switch_at": 0.5}
        response = await app.client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        wrong = await app.client.post("/sdapi/v1/txt2img",
                                      json={**body, "refiner_checkpoint": "other"})
        assert wrong.status_code == 422 and "refiner_checkpoint" in wrong.text
        out_of_range = await app.client.post("/sdapi/v1/txt2img",
                                             json={**body, "refiner_switch_at": 1.0})
        assert out_of_range.status_code == 422 and "refiner_switch_at" in out_of_range.text
        openai = await app.client.post("/v1/images/generations", json={
            "prompt": CAT.prompt, "seed": CAT.seed, "size": "64x64",
            "num_inference_steps": CAT.inference_steps, "refiner_switch": 0.5})
        assert openai.status_code == 200, openai.text
    import base64
    served = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    assert diff(served.convert("RGB"), engine.generate([CAT])[0]) <= 1
    via_openai = Image.open(io.BytesIO(base64.b64decode(openai.json()["data"][0]["b64_json"])))
    assert diff(via_openai.convert("RGB"), engine.generate([CAT])[0]) <= 1


async def test_a1111_refiner_checkpoint_without_a_refiner_names_the_field() -> None:
    async with in_process() as app:
        response = await app.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "refiner_checkpoint": "some-refiner", "refiner_switch_at": 0.8})
        assert response.status_code == 422
        assert "refiner_checkpoint" in response.text and "--refiner" in response.text
        # The web UI's own "no refiner": ignored.
        none = await app.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "refiner_checkpoint": "None", "refiner_switch_at": 0.8})
        assert none.status_code == 200, none.text
        assert all(i.refiner_switch == 0 for b in app.engine.batches for i in b)


def test_the_command_line_refuses_a_refiner_without_sdxl_before_binding() -> None:
    env = {**os.environ, "PYTHONPATH": "src"}
    done = subprocess.run(
        [sys.executable, "-m", "batchserve", "serve", "--model", "tiny", "--refiner",
         "tiny-sdxl-refiner", "--port", "1"],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "batchserve: invalid setting: --refiner: the refiner needs an SDXL base model; "
        "--model tiny is sd1"]
    with pytest.raises(SettingsError, match=r"^--refiner: .*--model sim is the simulated"):
        check_start(Settings(model="sim", refiner="tiny-sdxl-refiner"))


def test_a_refiner_beside_the_simulated_engine_names_the_flag() -> None:
    from batchserve.engines import load_engine

    with pytest.raises(SettingsError, match=r"^--refiner: "):
        load_engine(Settings(model="sim", refiner="tiny-sdxl-refiner"))


def test_a_refiner_folder_equals_the_preset(engine: DiffusionEngine, tmp_path: Path) -> None:
    """A diffusers folder (as Stability publishes the refiner) loads with the base's VAE and
    second encoder and gives the preset's images."""
    assert engine.refiner is not None
    engine.refiner.save_pretrained(tmp_path / "refiner")
    folder = DiffusionEngine.load(Settings(model="tiny-sdxl", refiner=str(tmp_path / "refiner"),
                                           warmup=""))
    assert folder.refiner.vae is folder.pipe.vae
    assert folder.refiner.text_encoder_2 is folder.pipe.text_encoder_2
    assert diff(folder.generate([CAT])[0], engine.generate([CAT])[0]) <= 1


def test_a_refiner_that_is_not_one_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"^--refiner="):
        DiffusionEngine.load(Settings(model="tiny-sdxl", refiner=str(tmp_path / "nothing"),
                                      warmup=""))


def test_a_job_record_keeps_the_switch() -> None:
    from batchserve.schema import T2IRequest

    request = validate({"prompt": "x", "refiner_switch": 0.7, "seed": 3}, Limits(refiner=True))
    assert request.fields()["refiner_switch"] == 0.7
    assert T2IRequest.from_fields(request.fields()) == request
    plain = validate({"prompt": "x", "seed": 3}, Limits(refiner=True))
    assert "refiner_switch" not in plain.fields()
