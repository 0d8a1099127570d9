"""Model families: detection from what is on disk, `--model-family`, and the family each engine
serves with."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from safetensors.numpy import save_file

from batchserve.engines.families import detect, resolve
from batchserve.settings import Settings, SettingsError


def _folder(tmp_path: Path, class_name: str) -> str:
    folder = tmp_path / class_name
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(folder)


def _single_file(tmp_path: Path, *keys: str) -> str:
    path = tmp_path / "model.safetensors"
    save_file({k: np.zeros(1, np.float32) for k in keys}, str(path))
    return str(path)


@pytest.mark.parametrize(("class_name", "family"), [
    ("StableDiffusionPipeline", "sd1"),
    ("StableDiffusionInpaintPipeline", "sd1"),  # an inpainting checkpoint is the family's
    ("StableDiffusionImg2ImgPipeline", "sd1"),
    ("StableDiffusionXLPipeline", "sdxl"),
    ("StableDiffusionXLInpaintPipeline", "sdxl"),
    ("StableDiffusionXLImg2ImgPipeline", "generic"),  # the refiner's class: --refiner says so
    ("FluxPipeline", "generic"),
])
def test_a_folder_is_known_by_its_pipeline_class(tmp_path: Path, class_name: str,
                                                 family: str) -> None:
    assert detect(_folder(tmp_path, class_name)) == family


@pytest.mark.parametrize(("key", "family"), [
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "sd1"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "sdxl"),
    ("conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight", "generic"),
    ("double_blocks.0.img_attn.proj.weight", "generic"),
])
def test_a_single_file_is_known_by_its_tensor_names(tmp_path: Path, key: str,
                                                    family: str) -> None:
    assert detect(_single_file(tmp_path, "model.diffusion_model.out.0.weight", key)) == family


def test_presets_and_unknown_names(monkeypatch: pytest.MonkeyPatch) -> None:
    assert detect("tiny") == "sd1"
    assert detect("tiny-sdxl") == "sdxl"
    assert detect("nobody/not-in-the-cache") is None
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SettingsError, match=r"^--model=nobody/not-in-the-cache: cannot tell its "
                                            r"family: no model_index.json .*on the hub "
                                            r"\(LocalEntry.*\); set --model-family to sd1, "
                                            r"sdxl or generic$"):
        resolve("auto", "nobody/not-in-the-cache")
    assert resolve("sdxl", "nobody/not-in-the-cache") == "sdxl"  # the flag tells instead


def test_a_hub_id_not_in_the_cache_is_told_by_its_model_index(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh machine: the hub id's model_index.json is fetched (once) into the hub's cache,
    not taken for SD 1.x (which loaded FLUX.1 as a StableDiffusionPipeline)."""
    fetched: list[str] = []

    def download(repo: str, name: str) -> str:
        fetched.append(f"{repo}/{name}")
        index = tmp_path / repo / name
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps({"_class_name": "FluxPipeline"}))
        return str(index)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve("auto", "someone/a-flux-model") == "generic"
    assert resolve("auto", "someone/a-flux-model") == "generic"
    assert fetched == ["someone/a-flux-model/model_index.json"]
    with pytest.raises(SettingsError, match=r"^--model-family=sd1: .* is a generic model"):
        resolve("sd1", "someone/a-flux-model")


def test_a_mismatch_is_one_line_naming_the_flag(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "StableDiffusionXLPipeline")
    assert resolve("auto", folder) == "sdxl"
    assert resolve("sdxl", folder) == "sdxl"
    with pytest.raises(SettingsError, match=r"^--model-family=sd1: .* is a sdxl model") as err:
        resolve("sd1", folder)
    assert "\n" not in str(err.value)


def test_generic_is_served(tmp_path: Path) -> None:
    """Any other diffusers pipeline's folder is `generic` (tests/test_generic_family.py)."""
    assert resolve("auto", _folder(tmp_path, "FluxPipeline")) == "generic"
    assert resolve("generic", "nobody/not-in-the-cache") == "generic"
    assert detect("tiny-flux") == "generic"


def test_the_flag_wins_when_nothing_tells(tmp_path: Path) -> None:
    assert resolve("sdxl", "nobody/not-in-the-cache") == "sdxl"
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not read")
    assert detect(str(pickled)) is None
    assert detect(str(pickled), _folder(tmp_path, "StableDiffusionXLPipeline")) == "sdxl"


def test_the_engine_refuses_a_mismatch_before_loading() -> None:
    from batchserve.engines.diffusion import DiffusionEngine
    from batchserve.settings import Settings

    with pytest.raises(SettingsError, match=r"^--model-family=sdxl: --model=.tiny. is a sd1"):
        DiffusionEngine.load(Settings(model="tiny", model_family="sdxl", warmup=""))


async def test_sdxl_defaults_and_sizes_reach_every_door() -> None:
    """Served as SDXL (the family from the settings alone): /v1/info says which sizes, a request
    without a size gets 1024x1024 through /t2i, OpenAI and A1111 (img2img too: the family's
    size, not A1111's 512 nor the 64x64 init image's), the OpenAPI defaults say so."""
    from inprocess import in_process

    from imagedata import b64, encode, gradient

    picture = encode(gradient(64, 64), "PNG")

    from fakes import FakeEngine

    engine = FakeEngine()
    async with in_process(engine, model_family="sdxl") as app:
        info = (await app.client.get("/v1/info")).json()
        assert info["sizes"]["default"] == "1024x1024"
        assert "832x1216" in info["sizes"]["presets"]
        assert info["sizes"]["multiple_of"] == 8
        assert (await app.client.post("/t2i", json={"prompt": "a", "seed": 1})).status_code == 200
        response = await app.client.post("/v1/images/generations", json={"prompt": "b"})
        assert response.status_code == 200, response.text
        for route, extra in (("txt2img", {}), ("img2img", {"init_images": [b64(picture)]})):
            answer = await app.client.post(f"/sdapi/v1/{route}",
                                           json={"prompt": "c", "steps": 2, **extra})
            assert answer.status_code == 200, answer.text
        bad = await app.client.post("/v1/images/generations", json={"prompt": "d", "size": "big"})
        assert bad.json()["error"]["message"] == 'size must be "WIDTHxHEIGHT", e.g. "1024x1024"'
        spec = (await app.client.get("/openapi.json")).json()
    assert [(i.width, i.height) for b in engine.batches for i in b] == [(1024, 1024)] * 4
    text = str(spec)
    assert "'default': '1024x1024'" in text and "'default': 1024" in text


async def test_sd1_keeps_512_and_a_size_off_the_grid_names_its_field() -> None:
    from inprocess import in_process

    from fakes import FakeEngine

    engine = FakeEngine()
    async with in_process(engine) as app:
        info = (await app.client.get("/v1/info")).json()
        assert info["sizes"]["default"] == "512x512"
        bad = await app.client.post("/t2i", json={"prompt": "a", "width": 1020})
        assert (await app.client.post("/t2i", json={"prompt": "a"})).status_code == 200
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "width"
    assert [(i.width, i.height) for b in engine.batches for i in b] == [(512, 512)]


def test_detection_and_the_service_import_no_torch() -> None:
    """The scheduler and HTTP side (a `--role api` process) learn the family without torch."""
    import subprocess
    import sys

    code = ("import sys, batchserve.service, batchserve.engines.families as f; "
            "f.detect('tiny-sdxl'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("model", "shapes"), [
    ("tiny", [(256, 256, 2), (512, 512, 2)]),  # what the fixed default was
    ("tiny-sdxl", [(512, 512, 2), (1024, 1024, 2)]),
    ("tiny-flux", [(128, 128, 2), (256, 256, 2)]),  # its own default size, multiples of 16
])
def test_the_warmup_follows_the_family(model: str, shapes: list[tuple[int, int, int]]) -> None:
    assert Settings(model=model).warmup_shapes() == shapes
    assert Settings(model=model, warmup="64x64x3").warmup_shapes() == [(64, 64, 3)]
    assert Settings(model=model, warmup="").warmup_shapes() == []


async def test_the_batching_key_lists_the_refiner_switch_when_a_refiner_is_loaded() -> None:
    from inprocess import in_process

    from fakes import FakeEngine

    for refiner, last in ((None, "start_step"), ("tiny-sdxl-refiner", "refiner_switch")):
        async with in_process(FakeEngine(), model_family="sdxl", refiner=refiner) as app:
            info = (await app.client.get("/v1/info")).json()
        assert info["batching"]["key"][-1] == last
