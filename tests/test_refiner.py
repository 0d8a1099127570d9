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


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, as on a machine without network. huggingface_hub reads HF_HUB_OFFLINE once, at
    import, so the module constant its requests check is set too."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_single_file_refiner_with_its_config_loads_offline_and_equals_the_preset(
        engine: DiffusionEngine, tmp_path: Path, offline: None) -> None:
    """Stability's refiner file layout (UNet, VAE, OpenCLIP bigG as embedder 0) with
    --refiner-config naming the diffusers folder of the same refiner: no hub needed, and the
    preset's images."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from ldm_layout import SDXL_REFINER_OPENCLIP_PREFIX, save_single_file
    from safetensors.torch import load_file

    assert engine.refiner is not None
    engine.refiner.save_pretrained(tmp_path / "config")
    file = save_single_file(engine.refiner, tmp_path / "sd_xl_refiner.safetensors")
    assert any(k.startswith(SDXL_REFINER_OPENCLIP_PREFIX) for k in load_file(file))
    # The file is one diffusers' loader takes as a refiner, its text encoder included (the
    # engine shares the base's instead, as the ensemble-of-experts recipe does).
    whole = StableDiffusionXLImg2ImgPipeline.from_single_file(
        str(file), config=str(tmp_path / "config"), local_files_only=True)
    for name, ours in whole.text_encoder_2.state_dict().items():
        assert torch.equal(ours, engine.refiner.text_encoder_2.state_dict()[name]), name

    loaded = DiffusionEngine.load(Settings(model="tiny-sdxl", refiner=str(file),
                                           refiner_config=str(tmp_path / "config"), warmup=""))
    assert loaded.refiner.text_encoder_2 is loaded.pipe.text_encoder_2
    for item in (CAT, DOG):
        assert diff(loaded.generate([item])[0], engine.generate([item])[0]) <= 1


def test_a_single_file_refiner_without_its_config_offline_names_the_setting(
        tmp_path: Path, offline: None) -> None:
    from ldm_layout import save_single_file

    from batchserve.engines import tiny_sdxl, tiny_sdxl_refiner

    base = tiny_sdxl.build_pipeline()
    file = save_single_file(tiny_sdxl_refiner.build_refiner(base), tmp_path / "r.safetensors")
    with pytest.raises(SettingsError, match=r"^--refiner='.*r\.safetensors': cannot load it .*"
                                            r"; --refiner-config can name its diffusers folder"):
        DiffusionEngine.load(Settings(model="tiny-sdxl", refiner=str(file), warmup=""))


def test_a_pickled_refiner_needs_allow_pickle(engine: DiffusionEngine, tmp_path: Path,
                                             offline: None) -> None:
    from ldm_layout import sdxl_state_dict

    from batchserve.engines.checkpoints import check_paths

    assert engine.refiner is not None
    engine.refiner.save_pretrained(tmp_path / "config")
    ckpt = tmp_path / "refiner.ckpt"
    torch.save({"state_dict": sdxl_state_dict(engine.refiner)}, ckpt)
    settings = Settings(model="tiny-sdxl", refiner=str(ckpt),
                        refiner_config=str(tmp_path / "config"), warmup="")
    with pytest.raises(SettingsError, match=r"^--refiner='.*refiner\.ckpt': \.ckpt files are "
                                            r"Python pickles.*--allow-pickle"):
        check_paths(settings)  # what the start checks before minutes of model loading
    with pytest.raises(SettingsError, match=r"^--refiner=.*--allow-pickle"):
        DiffusionEngine.load(settings)
    loaded = DiffusionEngine.load(replace(settings, allow_pickle=True))
    assert diff(loaded.generate([CAT])[0], engine.generate([CAT])[0]) <= 1


@pytest.mark.parametrize("item", [CAT, DOG, replace(CAT, sampler="heun", refiner_switch=0.4)],
                         ids=["dpm++", "euler-a", "heun"])
def test_a_whole_batch_counts_its_steps_through_the_hand_off(engine: DiffusionEngine,
                                                             item: GenerationItem) -> None:
    """Progress (`on_step`: job events, previews) of a whole batch goes 1..N over the base's
    and the refiner's steps together, N what the step core runs (the request's steps for a
    first-order sampler), and does not start again at the refiner."""
    seen: list[tuple[int, int]] = []
    previews: list[bytes | None] = []
    engine.generate([item], on_step=lambda done, total, preview: (
        seen.append((done, total)), previews.append(preview and preview(0))))
    total = engine.prepare([item])[0].remaining
    assert seen == [(k, total) for k in range(1, total + 1)]
    if item.sampler != "heun":
        assert total == item.inference_steps
    assert all(previews)  # the refiner's steps too (its latents are the base VAE's)


@pytest.mark.parametrize("policy", ["deadline", "continuous"])
async def test_served_progress_counts_through_the_hand_off_under_each_policy(
        engine: DiffusionEngine, policy: str) -> None:
    """The batch's progress as A1111's /sdapi/v1/progress reads it: the same count under a
    whole-batch policy as under the step-level one."""
    from batchserve.progress import BATCH, Progress

    seen: list[tuple[int, int]] = []
    async with in_process(engine, flush_policy=policy,  # type: ignore[arg-type]
                          max_wait_ms=1, refiner="tiny-sdxl-refiner") as app:

        def mirror(key: str, progress: Progress) -> None:
            if key == BATCH:
                seen.append((progress.step, progress.steps))

        app.service.progress.mirror = mirror
        response = await app.client.post("/t2i", json={
            "prompt": CAT.prompt, "seed": CAT.seed, "width": 64, "height": 64,
            "inference_steps": CAT.inference_steps, "refiner_switch": CAT.refiner_switch})
        assert response.status_code == 200, response.text
    # `continuous` drops the batch's progress at its last step instead (the batch emptied).
    last = 6 if policy == "deadline" else 5
    assert seen == [(k, 6) for k in range(1, last + 1)]
