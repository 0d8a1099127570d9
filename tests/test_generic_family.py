"""The `generic` family (`tiny-flux`): any other diffusers pipeline run whole, an item's image
the same alone or among strangers, FLUX's guidance as the model's input, its samplers and sizes
at every door, detection of a saved folder, and what it refuses at start."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import in_process
from PIL import Image
from test_jobs import finished, submitted

from batchserve.engines import GenerationItem, load_engine
from batchserve.engines.families import (
    check_start,
    detect,
    resolve,
    served_samplers,
    served_sizes,
)
from batchserve.engines.families.generic import (
    CLASSIC,
    FLOW,
    OTHER,
    samplers_of,
    scheduler_kind,
)
from batchserve.engines.generic import GenericEngine, auto_dtype
from batchserve.engines.protocol import ImageInput
from batchserve.errors import EngineOutOfMemory, Interrupted
from batchserve.service import Service
from batchserve.settings import Settings, SettingsError

CAT = GenerationItem("a red cat", "", 1, 64, 64, 3, 3.5, "flow-euler")
DOG = GenerationItem("a blue dog on a hill", "blurry", 2, 64, 64, 3, 3.5, "flow-euler")
TALL = GenerationItem("a tower", "", 3, 64, 96, 3, 3.5, "flow-euler")


@pytest.fixture(scope="module")
def engine() -> GenericEngine:
    return GenericEngine.load(Settings(model="tiny-flux", warmup=""))


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def diff(a: object, b: object) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def decoded(content: bytes) -> Image.Image:
    return Image.open(io.BytesIO(content)).convert("RGB")


def test_tiny_flux_is_a_batched_generic_flux(engine: GenericEngine) -> None:
    info = engine.info().to_dict()
    assert (info["family"], info["pipeline"], info["batched"]) == ("generic", "FluxPipeline",
                                                                   True)
    assert info["schedulers"] == ["flow-euler"] and info["scheduler"] == "flow-euler"
    assert info["demo_model"] is True


def test_alone_equals_in_a_batch_of_strangers(engine: GenericEngine) -> None:
    stranger = replace(CAT, prompt="something else entirely", seed=9)
    alone = [engine.generate([i])[0] for i in (CAT, DOG)]
    together = engine.generate([DOG, stranger, CAT])
    assert diff(alone[1], together[0]) <= 1
    assert diff(alone[0], together[2]) <= 1
    assert diff(together[1], together[2]) > 10  # images differ: the check can fail


def test_equals_diffusers_own_flux_pipeline(engine: GenericEngine) -> None:
    ours = engine.generate([DOG])[0]
    theirs = engine.pipe(prompt=DOG.prompt, width=DOG.width, height=DOG.height,
                         num_inference_steps=DOG.inference_steps, guidance_scale=3.5,
                         generator=torch.Generator().manual_seed(DOG.seed)).images[0]
    assert diff(ours, theirs) <= 1


def test_guidance_scale_is_the_models_guidance_input(engine: GenericEngine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """FLUX.1 is guidance-distilled: the request's guidance_scale reaches the transformer as
    its `guidance` input, one forward pass per step (no classifier-free guidance batch)."""
    seen: list[tuple[int, float]] = []
    forward = engine.pipe.transformer.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs["hidden_states"].shape[0], float(kwargs["guidance"][0])))
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.pipe.transformer, "forward", spy)
    low, high = (engine.generate([replace(CAT, guidance_scale=g)])[0] for g in (1.0, 6.0))
    assert seen == [(1, 1.0)] * 3 + [(1, 6.0)] * 3
    assert diff(low, high) > 10


def test_batched_per_item_generators_in_one_call(engine: GenericEngine,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    call = type(engine.pipe).__call__

    def count(pipe: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["generator"]))
        return call(pipe, **kwargs)

    monkeypatch.setattr(type(engine.pipe), "__call__", count)
    engine.generate([CAT, DOG])
    engine.batched = False  # a pipeline not known to take per-item generators: one per call
    try:
        alone = engine.generate([CAT, DOG])
    finally:
        engine.batched = True
    assert calls == [2, 1, 1]
    assert diff(alone[1], engine.generate([DOG])[0]) <= 1


def test_sizes_are_multiples_of_16_with_a_small_preset_default(engine: GenericEngine) -> None:
    sizes = served_sizes("tiny-flux")
    assert (sizes.default, sizes.multiple_of) == ((256, 256), 16)
    assert served_sizes("some/flux-in-no-cache", "generic").default == (1024, 1024)
    assert engine.generate([TALL])[0].size == (64, 96)


def test_a_deep_compression_vae_takes_multiples_of_32(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "SanaPipeline", "vae": ["diffusers", "AutoencoderDC"]}))
    sizes = served_sizes(str(tmp_path))
    assert sizes.multiple_of == 32 and all(not w % 32 and not h % 32 for w, h in sizes.presets)


@pytest.mark.parametrize("policy", ["deadline", "eager"])
async def test_served_batched_equals_alone(engine: GenericEngine, policy: str) -> None:
    items = (CAT, DOG, replace(CAT, prompt="another cat", seed=7))
    async with in_process(engine, model="tiny-flux",  # type: ignore[arg-type]
                          flush_policy=policy, max_wait_ms=200) as app:
        responses = await asyncio.gather(*(app.client.post("/t2i", json={
            "prompt": i.prompt, "negative_prompt": i.negative_prompt, "seed": i.seed,
            "width": i.width, "height": i.height, "inference_steps": i.inference_steps,
            "guidance_scale": i.guidance_scale}) for i in items))
    batch_sizes = [int(r.headers["x-batch-size"]) for r in responses]
    if policy == "deadline":
        assert batch_sizes == [3, 3, 3]
    for item, response in zip(items, responses, strict=True):
        assert response.status_code == 200, response.text
        assert diff(decoded(response.content), engine.generate([item])[0]) <= 1


async def test_every_door_with_the_familys_rules(engine: GenericEngine) -> None:
    async with in_process(engine, model="tiny-flux", max_wait_ms=0) as app:  # type: ignore[arg-type]
        info = (await app.client.get("/v1/info")).json()
        assert info["sizes"]["default"] == "256x256" and info["sizes"]["multiple_of"] == 16
        assert info["samplers"] == {"served": ["flow-euler"], "default": "flow-euler"}
        plain = await app.client.post("/t2i", json={"prompt": "x", "inference_steps": 2})
        assert plain.status_code == 200 and decoded(plain.content).size == (256, 256)

        bad = await app.client.post("/t2i", json={"prompt": "x", "sampler": "euler"})
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "sampler"
        assert "flow-euler" in bad.json()["error"]["message"]
        odd = await app.client.post("/t2i", json={"prompt": "x", "width": 264})
        assert odd.status_code == 422 and "multiple of 16" in odd.json()["error"]["message"]
        image = base64.b64encode(plain.content).decode()
        refused = await app.client.post("/t2i", json={"prompt": "x", "init_image": image,
                                                      "mask_image": image})
        assert refused.status_code == 422
        assert refused.json()["error"]["field"] == "mask_image"
        varied = await app.client.post("/t2i", json={
            "prompt": "x", "init_image": image, "strength": 0.5, "inference_steps": 4,
            "seed": 3})
        assert varied.status_code == 200, varied.text
        assert decoded(varied.content).size == (256, 256)

        job = await submitted(app, prompt="a job", seed=5, width=64, height=64,
                              inference_steps=3, guidance_scale=3.5)
        view = await finished(app, job)
        assert view["status"] == "succeeded" and view["request"]["sampler"] == "flow-euler"
        got = await app.client.get(f"/v1/jobs/{job}/image")
        alone = engine.generate([GenerationItem("a job", "", 5, 64, 64, 3, 3.5, "flow-euler")])
        assert diff(decoded(got.content), alone[0]) <= 1

        openai = await app.client.post("/v1/images/generations", json={
            "prompt": "x", "size": "264x264", "num_inference_steps": 2})
        assert openai.status_code == 422 and openai.json()["error"]["param"] == "size"
        openai = await app.client.post("/v1/images/generations", json={
            "prompt": "x", "num_inference_steps": 2, "response_format": "b64_json"})
        assert openai.status_code == 200, openai.text
        first = base64.b64decode(openai.json()["data"][0]["b64_json"])
        assert decoded(first).size == (256, 256)

        a1111 = await app.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "steps": 2, "width": 128, "height": 64, "sampler_name": "flow-euler"})
        assert a1111.status_code == 200, a1111.text
        assert decoded(base64.b64decode(a1111.json()["images"][0])).size == (128, 64)
        forge = await app.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "steps": 2, "width": 128, "height": 64, "sampler_name": "Euler",
            "seed": 4})
        assert forge.status_code == 200 and forge.json()["parameters"]["sampler_name"] == "Euler"
        a1111 = await app.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "steps": 2, "sampler_name": "Euler a"})
        assert a1111.status_code == 422 and "flow-euler" in a1111.text
        listed = (await app.client.get("/sdapi/v1/samplers")).json()
        assert listed == [{"name": "Euler", "aliases": ["flow-euler"], "options": {}}]


def test_a_saved_flux_folder_is_detected_and_served(engine: GenericEngine,
                                                     tmp_path: Path) -> None:
    folder = tmp_path / "flux"
    engine.pipe.save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert detect(str(folder)) == "generic" and resolve("auto", str(folder)) == "generic"
    assert served_samplers(str(folder), "dpm++2m-karras") == (("flow-euler",), "flow-euler")
    loaded = load_engine(Settings(model=str(folder), warmup=""))
    assert isinstance(loaded, GenericEngine)
    assert loaded.info().to_dict()["demo_model"] is False
    assert diff(loaded.generate([DOG])[0], engine.generate([DOG])[0]) <= 1
    with pytest.raises(SettingsError, match=r"^--model-family=sdxl: .* is a generic model"):
        resolve("sdxl", str(folder))


def test_scheduler_kinds_name_the_samplers() -> None:
    assert scheduler_kind("FlowMatchEulerDiscreteScheduler") == FLOW
    assert scheduler_kind(None) == FLOW  # nothing on disk: what generic pipelines mostly are
    assert scheduler_kind("DPMSolverMultistepScheduler", {"prediction_type": "epsilon"}) == CLASSIC
    assert scheduler_kind("DPMSolverMultistepScheduler", {"use_flow_sigmas": True}) == OTHER
    assert samplers_of(FLOW) == ("flow-euler",) and samplers_of(OTHER) == ("native",)
    assert "euler-a" in samplers_of(CLASSIC)


def test_a_scheduler_the_model_cannot_use_stops_the_start() -> None:
    with pytest.raises(SettingsError, match=r"^--scheduler=euler: --model=tiny-flux can use "
                                            r"flow-euler$"):
        Service(Settings(model="tiny-flux", scheduler="euler", warmup=""))
    with pytest.raises(SettingsError, match=r"^--scheduler=flow-euler: --model=tiny can use "):
        Service(Settings(model="tiny", scheduler="flow-euler", warmup=""))


@pytest.mark.parametrize(("overrides", "flag"), [
    ({"flush_policy": "continuous"}, "--flush-policy=continuous"),
    ({"refiner": "tiny-sdxl-refiner"}, "--refiner"),
    ({"lora_dir": "."}, "--lora-dir"),
    ({"clip_skip": 2}, "--clip-skip=2"),
])
def test_what_generic_cannot_do_is_one_start_up_line(overrides: dict[str, Any],
                                                     flag: str) -> None:
    with pytest.raises(SettingsError) as err:
        load_engine(Settings(model="tiny-flux", warmup="", **overrides))
    assert str(err.value).startswith(flag + ":") and "\n" not in str(err.value)


def test_continuous_refusal_names_the_flag_and_the_way_out() -> None:
    with pytest.raises(SettingsError, match="use --flush-policy=deadline or eager"):
        load_engine(Settings(model="tiny-flux", flush_policy="continuous", warmup=""))


def test_a_generic_single_file_is_refused_naming_the_flag(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    file = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.proj.weight": np.zeros(1, np.float32)}, str(file))
    with pytest.raises(SettingsError, match=r"^--model=.*flux.safetensors: a single-file"):
        resolve("auto", str(file))


def test_warmup_shapes_follow_the_size_rule() -> None:
    with pytest.raises(SettingsError, match=r"^--warmup: 72x72 must be multiples of 16"):
        load_engine(Settings(model="tiny-flux", warmup="72x72x1"))


def test_steps_are_reported_and_a_stop_ends_the_batch(engine: GenericEngine) -> None:
    """Progress through diffusers' step-end callback: every step, no previews (a generic
    latent space has no RGB projection); nobody waiting ends the batch between steps."""
    seen: list[tuple[int, int, bool]] = []
    engine.generate([CAT, DOG], on_step=lambda done, total, preview: seen.append(
        (done, total, preview is not None and preview(0) is not None)))
    assert seen == [(1, 3, False), (2, 3, False), (3, 3, False)]
    polls: list[int] = []

    def stop() -> bool:
        polls.append(1)
        return len(polls) >= 2

    with pytest.raises(Interrupted, match="stopped after step 2"):
        engine.generate([CAT], should_stop=stop)


def test_the_command_line_refuses_continuous_before_binding() -> None:
    env = {**os.environ, "PYTHONPATH": "src"}
    done = subprocess.run(
        [sys.executable, "-m", "batchserve", "serve", "--model", "tiny-flux",
         "--flush-policy", "continuous", "--port", "1"],
        capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "batchserve: invalid setting: --flush-policy=continuous: --model=tiny-flux is a generic "
        "diffusers pipeline, which runs whole batches only (no step-wise engine); use "
        "--flush-policy=deadline or eager"]


def picture(seed: int, width: int = 64, height: int = 64) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8).tobytes()


def test_img2img_alone_equals_in_a_batch_and_diffusers_own(engine: GenericEngine) -> None:
    """Items with an init image go whole through FLUX's img2img sibling: each item's image is
    encoded and noised with its own generator, from the start step its strength gives."""
    assert engine.info().to_dict()["img2img"] == "FluxImg2ImgPipeline"
    first = replace(CAT, init=ImageInput(64, 64, picture(1), 0.5), inference_steps=4)
    second = replace(DOG, init=ImageInput(64, 64, picture(2), 0.55), inference_steps=4)
    assert first.key == second.key  # both start at step 2 of 4
    alone = [engine.generate([i])[0] for i in (first, second)]
    together = engine.generate([second, CAT, first])  # a text item too (another call)
    assert diff(alone[0], together[2]) <= 1 and diff(alone[1], together[0]) <= 1
    assert diff(together[1], engine.generate([CAT])[0]) <= 1
    assert diff(alone[0], engine.generate([replace(first, init=None)])[0]) > 10
    assert engine.img2img is not None
    theirs = engine.img2img(
        prompt=first.prompt, image=Image.frombytes("RGB", (64, 64), picture(1)), strength=0.5,
        width=64, height=64, num_inference_steps=4, guidance_scale=first.guidance_scale,
        generator=torch.Generator().manual_seed(first.seed)).images[0]
    assert diff(alone[0], theirs) <= 1


def test_a_mask_is_refused_by_the_engine_too(engine: GenericEngine) -> None:
    masked = replace(CAT, init=ImageInput(64, 64, picture(1), 0.5, mask=b"\xff" * 64 * 64))
    with pytest.raises(ValueError, match="mask_image"):
        engine.generate([masked])


def test_auto_dtype_is_bf16_on_a_gpu_that_has_it() -> None:
    """FLUX's T5 overflows in fp16: auto means bf16 on CUDA where supported (a pure rule, so
    the GPU path is tested here); what is asked stays, and the CPU keeps fp32."""
    assert auto_dtype("auto", cuda=True, bf16=True) == "bf16"
    assert auto_dtype("auto", cuda=True, bf16=False) == "auto"  # plan_tuning: fp16
    assert auto_dtype("fp16", cuda=True, bf16=True) == "fp16"
    assert auto_dtype("auto", cuda=False, bf16=False) == "auto"  # plan_tuning: fp32


def test_out_of_memory_is_the_engines_error(engine: GenericEngine,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The service splits a batch on `EngineOutOfMemory` (as for every engine)."""
    def full(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "pipe", _Calls(full))
    with pytest.raises(EngineOutOfMemory, match="Tried to allocate"):
        engine.generate([CAT, DOG])


class _Calls:
    def __init__(self, call: Any) -> None:
        self.call = call

    def __call__(self, **kwargs: Any) -> Any:
        return self.call(**kwargs)


def test_a_scheduler_other_than_read_from_disk_stops_the_start(engine: GenericEngine) -> None:
    """The doors validate samplers from what disk said before loading; a loaded scheduler of
    another kind (a hub id downloaded only while loading) must not serve other names."""
    from diffusers import DPMSolverMultistepScheduler

    from batchserve.engines.tiny_flux import build_pipeline

    pipe = build_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler()
    with pytest.raises(SettingsError, match=r"^--model=tiny-flux: its scheduler "
                                            r"DPMSolverMultistepScheduler takes dpm\+\+2m-karras"):
        GenericEngine(pipe, engine.plan, engine.settings)


def test_an_sdxl_refiner_as_the_model_points_to_refiner(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    with pytest.raises(SettingsError, match=r"^--model=.*: an SDXL refiner .* --refiner"):
        check_start(Settings(model=str(tmp_path), warmup=""))
