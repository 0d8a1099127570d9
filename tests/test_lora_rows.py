"""Per-request LoRA on the tiny model: an item's image depends on its own adapters only.

Files are written in both layouts people use (kohya / A1111 and diffusers), with random weights
on attention, feed-forward, 1x1 and 3x3 convolutions, time embeddings and the text encoder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from loras import diffusers_format, kohya
from test_stepwise import pixels, run_until_done

from batchserve.engines import GenerationItem, LoraPick
from batchserve.engines import tiny as tiny_preset
from batchserve.engines.diffusion import DiffusionEngine, make_scheduler
from batchserve.engines.lora import LoraLibrary
from batchserve.engines.lora.files import Unusable, inspect, signature
from batchserve.settings import Settings

BASE = GenerationItem("a red cube on a table", "blurry", 7, 64, 64, 4, 7.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    pipe = tiny_preset.build_pipeline()
    kohya(root / "ink.safetensors", pipe, seed=1)  # alpha 2, rank 4
    diffusers_format(root / "neon.safetensors", pipe, seed=2)  # alpha 8, rank 4
    kohya(root / "grain.safetensors", pipe, seed=3, rank=8, alpha=None, text=False)
    return root


@pytest.fixture(scope="module")
def engine(folder: Path) -> DiffusionEngine:
    engine = DiffusionEngine.load(Settings(model="tiny", warmup="", lora_dir=str(folder)))
    engine.use_loras(LoraLibrary(folder))
    return engine


def item(seed: int, *loras: tuple[str, float], prompt: str = BASE.prompt,
         guidance: float = 7.5, steps: int = 4) -> GenerationItem:
    return replace(BASE, seed=seed, prompt=prompt, guidance_scale=guidance,
                   inference_steps=steps, loras=tuple(LoraPick(n, s) for n, s in loras))


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.abs(a - b).max() <= 1)


def test_both_layouts_are_read_onto_every_kind_of_layer(folder: Path,
                                                        engine: DiffusionEngine) -> None:
    entries = engine.lora.library.entries()  # type: ignore[union-attr]
    assert {n: e.usable for n, e in entries.items()} == {"grain": True, "ink": True,
                                                          "neon": True}
    assert entries["ink"].components == ("unet", "text_encoder")
    assert entries["grain"].components == ("unet",) and entries["grain"].rank == 8
    kinds = {type(m).__name__ for e in ("ink", "neon")
             for layer in entries[e].layout.layers
             for m in [dict(engine.pipe.unet.named_modules()).get(layer.module)] if m}
    assert kinds == {"Linear", "Conv2d"}


def test_mixed_batch_equals_each_item_alone(engine: DiffusionEngine) -> None:
    items = [item(1, ("ink", 0.8)), item(2, ("neon", 1.0)), item(3),
             item(4, ("ink", 0.5), ("grain", -1.2)), item(5, ("neon", 0.7), ("ink", 0.3))]
    batch = [pixels(image) for image in engine.generate(items)]
    for got, one in zip(batch, items, strict=True):
        assert close(got, pixels(engine.generate([one])[0])), one.loras
    # the adapters change the images (so the check above can fail) ...
    plain = pixels(engine.generate([item(1)])[0])
    assert np.abs(batch[0] - plain).max() > 10
    # ... and a row without LoRA is the model's own image
    untouched = DiffusionEngine.load(Settings(model="tiny", warmup=""))
    assert close(batch[2], pixels(untouched.generate([item(3)])[0]))


def test_step_core_mixes_adapters_and_joiners_bring_theirs(engine: DiffusionEngine) -> None:
    first = [item(11, ("ink", 1.0), steps=5), item(12)]
    # a joiner without guidance has one UNet row, the others two
    joiners = [item(13, ("neon", 0.6), ("grain", 0.9), steps=3),
               item(14, ("grain", 1.5), guidance=1.0)]
    alone = {i: pixels(engine.generate([i])[0]) for i in first + joiners}
    joined = run_until_done(engine, engine.prepare(first), joiners, join_after=2)
    for one in first + joiners:
        assert close(joined[one], alone[one]), one.loras


def test_equals_diffusers_load_lora_weights_and_fused_lora(folder: Path,
                                                           engine: DiffusionEngine) -> None:
    for name, scale in (("ink", 0.8), ("neon", -0.6)):
        mine = pixels(engine.generate([item(21, (name, scale))])[0])
        pipe = tiny_preset.build_pipeline()
        pipe.load_lora_weights(str(folder / f"{name}.safetensors"), adapter_name=name)
        pipe.set_adapters([name], [scale])
        # as `DiffusionEngine.load` does: the served sampler, on the checkpoint's config
        pipe.scheduler = make_scheduler(engine.settings.scheduler, pipe.scheduler.config)
        reference = DiffusionEngine(pipe, engine.plan, engine.settings)
        theirs = pixels(reference.generate([item(21)])[0])
        assert close(mine, theirs), name
        fused = DiffusionEngine.load(Settings(
            model="tiny", warmup="", lora=f"{folder / name}.safetensors:{scale}"))
        assert close(mine, pixels(fused.generate([item(21)])[0])), name


def test_rows_without_lora_run_no_hook_work(engine: DiffusionEngine,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    engine.generate([item(31, ("ink", 1.0))])  # loaded: its layers carry hooks
    calls: list[int] = []
    ink = next(iter(engine.lora.adapters.components["unet"].layers.values()))  # type: ignore
    layer = type(ink)
    original = layer._apply

    def counted(self: object, x: torch.Tensor, delta: object) -> torch.Tensor:
        if self is ink:
            calls.append(x.shape[0])
        return original(self, x, delta)  # type: ignore[arg-type]

    monkeypatch.setattr(layer, "_apply", counted)
    engine.generate([item(32), item(33)])
    assert calls == []
    engine.generate([item(32), item(34, ("ink", 1.0))])
    assert calls and set(calls) == {2}  # one item's two guidance rows, never the other's


def test_files_that_do_not_fit_are_unusable_with_a_reason(tmp_path: Path) -> None:
    pipe = tiny_preset.build_pipeline()
    model = signature({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    sd15 = tiny_preset.build_pipeline()
    sd15.unet = type(pipe.unet)(**{**pipe.unet.config, "cross_attention_dim": 48})
    wide = kohya(tmp_path / "wide.safetensors", sd15, seed=1, text=False)
    with pytest.raises(Unusable, match=r"made for a layer of 48 -> .*a LoRA for another model"):
        inspect(wide, model)
    alien = kohya(tmp_path / "alien.safetensors", pipe, seed=1, text=False,
                  unet_prefix="lora_unet_nothing_like_")
    with pytest.raises(Unusable, match="no such layer in this model"):
        inspect(alien, model)
    xl = tmp_path / "xl.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
               torch.zeros(4, 32),
               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight":
               torch.zeros(32, 4)}, str(xl))
    with pytest.raises(Unusable, match="text_encoder_2 layers, which this model does not have"):
        inspect(xl, model)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(Unusable, match="not a readable safetensors file"):
        inspect(junk, model)


def test_sdxl_mixed_batch_equals_each_item_alone(tmp_path: Path) -> None:
    from batchserve.engines import tiny_sdxl

    pipe = tiny_sdxl.build_pipeline()
    kohya(tmp_path / "a.safetensors", pipe, seed=5, text=False)
    kohya(tmp_path / "b.safetensors", pipe, seed=6, text=False, rank=8)
    xl = DiffusionEngine.load(Settings(model="tiny-sdxl", warmup="", lora_dir=str(tmp_path)))
    xl.use_loras(LoraLibrary(tmp_path))
    items = [item(1, ("a", 0.8)), item(2), item(3, ("b", 1.0), ("a", -0.5))]
    batch = [pixels(image) for image in xl.generate(items)]
    for got, one in zip(batch, items, strict=True):
        assert close(got, pixels(xl.generate([one])[0])), one.loras
    assert np.abs(batch[0] - pixels(xl.generate([item(1)])[0])).max() > 10
