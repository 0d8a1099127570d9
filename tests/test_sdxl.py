"""SDXL (`tiny-sdxl`): the family's conditioning equals diffusers' own SDXL pipeline, and an item's
image does not depend on who shares its batch or its steps, under every policy."""

from __future__ import annotations

import asyncio
import contextlib
import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from inprocess import in_process
from ldm_layout import save_single_file
from PIL import Image
from test_stepwise import pixels, run_until_done

from batchserve.engines import GenerationItem, LoraPick, tiny_sdxl
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.engines.families.sdxl import SDXL
from batchserve.engines.lora import LoraLibrary
from batchserve.engines.prompts import CHUNK
from batchserve.engines.tiny_sdxl import TEXT_DIM
from batchserve.settings import Settings, SettingsError

CAT = GenerationItem("a red cat", "", 1, 64, 64, 4, 7.5)
DOG = GenerationItem("a blue dog", "blurry", 2, 64, 64, 3, 5.0, "euler-a")
LAMP = GenerationItem("a lamp", "", 3, 64, 64, 2, 1.0)  # no guidance: one UNet row
WORDY = GenerationItem("a lighthouse on a cliff at dusk, " * 6, "", 4, 64, 64, 3, 6.0)


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny-sdxl", warmup=""))


def diff(a: object, b: object) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def test_tiny_sdxl_is_served_by_the_sdxl_family(engine: DiffusionEngine) -> None:
    assert isinstance(engine.family, SDXL)
    assert type(engine.pipe).__name__ == "StableDiffusionXLPipeline"
    assert engine.info().to_dict()["family"] == "sdxl"


@pytest.mark.parametrize("item", [CAT, DOG, LAMP], ids=["empty-negative", "negative", "no-cfg"])
def test_equals_diffusers_own_pipeline_on_the_prompt_text(engine: DiffusionEngine,
                                                          item: GenerationItem) -> None:
    """Both encoders, the pooled embedding, the zeroed empty negative prompt and the time ids
    are diffusers' own: its pipeline given the text makes the same image."""
    ours = engine.generate([item])[0]
    engine.pipe.scheduler = engine._scheduler_for(item)
    theirs = engine.pipe(
        prompt=item.prompt, negative_prompt=item.negative_prompt or None, width=item.width,
        height=item.height, num_inference_steps=item.inference_steps,
        guidance_scale=item.guidance_scale, generator=torch.Generator().manual_seed(item.seed),
    ).images[0]
    engine.sampler = ""  # the engine's sampler bookkeeping: rebuilt on the next batch
    assert diff(ours, theirs) <= 1


def test_alone_equals_in_a_batch_of_strangers(engine: DiffusionEngine) -> None:
    stranger = GenerationItem("something else entirely", "ugly", 9, 64, 64, 4, 7.5)
    wordy = replace(WORDY, inference_steps=4, guidance_scale=7.5)
    alone = [engine.generate([i])[0] for i in (CAT, wordy)]
    together = engine.generate([CAT, stranger, wordy])
    assert diff(alone[0], together[0]) <= 1
    assert diff(alone[1], together[2]) <= 1
    assert diff(together[0], together[1]) > 10  # images differ: the check can fail


def test_joined_part_way_equals_alone(engine: DiffusionEngine) -> None:
    alone = {item: pixels(engine.generate([item])[0]) for item in (CAT, DOG, LAMP, WORDY)}
    joined = run_until_done(engine, engine.prepare([CAT]), [DOG, LAMP, WORDY], join_after=1)
    for item, image in alone.items():
        assert np.abs(joined[item] - image).max() <= 1, item


# -- long prompts: 75-token chunks through both encoders ---------------------------------------

HEAD = "a lighthouse on a cliff at dusk, " * 3  # 78 tokens: the tiny tokenizer spells words out
RED, BLUE = (GenerationItem(HEAD + tail, "", 1, 64, 64, 3, 7.5)
             for tail in ("red red red, " * 4, "blue blue blue, " * 4))  # alike in 75 tokens


def test_each_encoder_reads_every_chunk_and_pools_the_first(engine: DiffusionEngine) -> None:
    """Both encoders' states are 77-token chunks side by side along the sequence, so text past
    75 tokens reaches both halves of the conditioning; the pooled embedding is
    text_encoder_2's of the first chunk (as A1111 and compel make it), which is diffusers' own:
    its pipeline truncates, so its states are our first chunk."""
    assert len(engine.prompts._token_ids([HEAD])[0]) > CHUNK
    with torch.inference_mode():
        text = engine.family.encode([RED, BLUE], guided=False)  # type: ignore[attr-defined]
        theirs, _, pooled, _ = engine.pipe.encode_prompt(RED.prompt,
                                                         do_classifier_free_guidance=False)
    assert text.embeds.shape[1] == 2 * (CHUNK + 2)
    first, second = text.embeds[:, :CHUNK + 2], text.embeds[:, CHUNK + 2:]
    assert torch.allclose(first[0], first[1])
    assert torch.allclose(first[0], theirs[0], atol=1e-5)
    for encoder, dims in (("text_encoder", slice(0, TEXT_DIM)),
                          ("text_encoder_2", slice(TEXT_DIM, None))):
        assert (second[0, :, dims] - second[1, :, dims]).abs().max() > 0.1, encoder
    assert torch.allclose(text.pooled[0], text.pooled[1])
    assert torch.allclose(text.pooled[0], pooled[0], atol=1e-5)


def test_text_past_77_tokens_changes_the_image_only_when_chunked(engine: DiffusionEngine) -> None:
    """`--long-prompts chunk` (the default) sees the tail; `truncate` cuts it, and is then
    diffusers' own pipeline given the whole text."""
    assert diff(engine.generate([RED])[0], engine.generate([BLUE])[0]) > 10
    truncating = DiffusionEngine.load(Settings(model="tiny-sdxl", long_prompts="truncate",
                                               warmup=""))
    cut = [truncating.generate([item])[0] for item in (RED, BLUE)]
    assert diff(cut[0], cut[1]) == 0
    truncating.pipe.scheduler = truncating._scheduler_for(RED)
    assert diff(cut[0], _diffusers_image(truncating.pipe, RED)) <= 1


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_a_long_prompt_alone_equals_itself_beside_a_short_one(engine: DiffusionEngine,
                                                              guidance: float) -> None:
    """Two, one and (a long negative prompt) three chunks in one batch: padded with the empty
    prompt, masked, and each item's image is its own."""
    long = replace(RED, guidance_scale=guidance)
    short = GenerationItem("a cat", HEAD * 2, 8, 64, 64, 3, guidance)
    with torch.inference_mode():
        padded = engine.family.encode([long, short],  # type: ignore[attr-defined]
                                      guided=guidance > 1)
    assert padded.mask is not None
    assert padded.embeds.shape[1] == (3 if guidance > 1 else 2) * (CHUNK + 2)
    together = engine.generate([long, short])
    for item, image in zip((long, short), together, strict=True):
        assert diff(image, engine.generate([item])[0]) <= 1, item.prompt[:20]
    assert diff(together[0], together[1]) > 10


def test_micro_conditioning_is_each_items_own(engine: DiffusionEngine) -> None:
    """Each item's rows carry the time ids diffusers makes for it alone."""
    wide = GenerationItem("a wide view", "", 5, 128, 64, 2, 7.5)
    for item in (CAT, wide):
        (state,) = engine.prepare([item])
        expected = engine.pipe._get_add_time_ids(
            (item.height, item.width), (0, 0), (item.height, item.width), dtype=torch.float32,
            text_encoder_projection_dim=engine.pipe.text_encoder_2.config.projection_dim)
        for row in state.rows:  # type: ignore[attr-defined]
            assert torch.equal(row.added["time_ids"], expected)


@pytest.mark.parametrize("policy", ["deadline", "eager", "continuous"])
async def test_served_under_every_policy_equals_alone(engine: DiffusionEngine,
                                                      policy: str) -> None:
    items = (CAT, DOG, replace(CAT, prompt="another cat", seed=7))
    async with in_process(engine, flush_policy=policy,  # type: ignore[arg-type]
                          max_wait_ms=50) as app:
        responses = await asyncio.gather(*(app.client.post("/t2i", json={
            "prompt": i.prompt, "negative_prompt": i.negative_prompt, "seed": i.seed,
            "width": i.width, "height": i.height, "inference_steps": i.inference_steps,
            "guidance_scale": i.guidance_scale, **({"sampler": i.sampler} if i.sampler else {}),
        }) for i in items))
    for item, response in zip(items, responses, strict=True):
        assert response.status_code == 200, response.text
        served = Image.open(io.BytesIO(response.content)).convert("RGB")
        assert diff(served, engine.generate([item])[0]) <= 1


def test_single_file_in_the_original_layout_equals_its_folder(engine: DiffusionEngine,
                                                               tmp_path: Path) -> None:
    """Stability's layout (`conditioner.embedders.0.transformer.*` CLIP,
    `conditioner.embedders.1.model.*` OpenCLIP, `label_emb`), loaded offline with
    --model-config: known as SDXL from its tensor names, the same images as the folder."""
    engine.pipe.save_pretrained(tmp_path / "folder")
    file = save_single_file(engine.pipe, tmp_path / "community-xl.safetensors")
    loaded = DiffusionEngine.load(Settings(model=str(file), model_config=str(tmp_path / "folder"),
                                           warmup=""))
    assert isinstance(loaded.family, SDXL)
    for item in (DOG, WORDY):
        assert diff(loaded.generate([item])[0], engine.generate([item])[0]) <= 1
    with pytest.raises(SettingsError, match=r"^--model-family=sd1: .* is a sdxl model"):
        DiffusionEngine.load(Settings(model=str(file), model_family="sd1",
                                      model_config=str(tmp_path / "folder"), warmup=""))


# -- community files on SDXL: embeddings, clip skip, LoRA, VAE ---------------------------------

def _diffusers_image(pipe: object, item: GenerationItem, **extra: object) -> object:
    return pipe(  # type: ignore[operator]
        prompt=item.prompt, negative_prompt=item.negative_prompt or None, width=item.width,
        height=item.height, num_inference_steps=item.inference_steps,
        guidance_scale=item.guidance_scale, generator=torch.Generator().manual_seed(item.seed),
        **extra).images[0]


def test_sdxl_embedding_loads_clip_l_and_clip_g(tmp_path: Path) -> None:
    """One file, a tensor per encoder (clip_l 32 wide, clip_g 48 wide, two vectors each): the
    prompt naming it equals diffusers' own pipeline with both halves loaded."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(3)
    file = tmp_path / "xlstyle.safetensors"
    save_file({"clip_l": torch.randn(2, 32, generator=generator),
               "clip_g": torch.randn(2, 48, generator=generator)}, str(file))
    engine = DiffusionEngine.load(Settings(model="tiny-sdxl", embeddings=str(file), warmup=""))
    assert engine.info().to_dict()["embeddings"][0]["vectors"] == 2
    item = GenerationItem("a xlstyle cat", "", 1, 64, 64, 3, 7.5)
    plain = DiffusionEngine.load(Settings(model="tiny-sdxl", warmup=""))
    ours = engine.generate([item])[0]
    assert diff(ours, plain.generate([item])[0]) > 10
    engine.pipe.scheduler = engine._scheduler_for(item)
    # diffusers' pipeline expands the multi-vector token itself (`maybe_convert_prompt`)
    assert diff(ours, _diffusers_image(engine.pipe, item)) <= 1
    bad = tmp_path / "sd1style.safetensors"
    save_file({"emb_params": torch.zeros(1, 32)}, str(bad))
    with pytest.raises(SettingsError, match=r"not an SDXL embedding \(no clip_l or clip_g"):
        DiffusionEngine.load(Settings(model="tiny-sdxl", embeddings=str(bad), warmup=""))


def test_clip_skip_counts_from_the_penultimate_layer(engine: DiffusionEngine) -> None:
    """SDXL conditions on the penultimate layer already (clip skip 1); --clip-skip 2 is
    diffusers' `clip_skip=1` on its SDXL pipeline. (That pipeline skips layers for the prompt
    only, never for a negative prompt; ours for both, as the web UIs do: so an item with an
    empty negative prompt, zeroed either way, is the reference.)"""
    skipped = DiffusionEngine.load(Settings(model="tiny-sdxl", clip_skip=2, warmup=""))
    ours = skipped.generate([CAT])[0]
    assert diff(ours, engine.generate([CAT])[0]) > 10
    skipped.pipe.scheduler = skipped._scheduler_for(CAT)
    assert diff(ours, _diffusers_image(skipped.pipe, CAT, clip_skip=1)) <= 1
    with pytest.raises(SettingsError, match=r"--clip-skip=3: .* only 2 layers"):
        DiffusionEngine.load(Settings(model="tiny-sdxl", clip_skip=3, warmup=""))


def test_lora_is_fused_into_the_sdxl_unet(engine: DiffusionEngine, tmp_path: Path) -> None:
    from community import kohya_lora

    file = kohya_lora(tmp_path / "xl-lora.safetensors", engine.pipe.unet, seed=5)
    zero = DiffusionEngine.load(Settings(model="tiny-sdxl", lora=f"{file}:0", warmup=""))
    fused = DiffusionEngine.load(Settings(model="tiny-sdxl", lora=str(file), warmup=""))
    assert fused.info().to_dict()["loras"][0]["components"] == ["unet"]
    assert diff(zero.generate([CAT])[0], engine.generate([CAT])[0]) <= 1
    ours = fused.generate([CAT])[0]
    assert diff(ours, engine.generate([CAT])[0]) > 10
    # diffusers' own pipeline with the adapter loaded, not fused
    plain = DiffusionEngine.load(Settings(model="tiny-sdxl", warmup=""))
    plain.pipe.load_lora_weights(str(file))
    assert diff(ours, plain.generate([CAT])[0]) <= 1


# diffusers' SDXL LoRA training scripts (`train_dreambooth_lora_sdxl.py`) adapt these layers
ADAPTED = {"unet": ("to_q", "to_k", "to_v", "to_out.0"),
           "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
           "text_encoder_2": ("q_proj", "k_proj", "v_proj", "out_proj")}
Trained = dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]


@pytest.fixture(scope="module")
def trained() -> Trained:
    """An SDXL LoRA as those scripts make one: a PEFT adapter (rank 4, alpha 8) on each
    component, read back with `get_peft_model_state_dict`; seeded random weights stand in for
    trained ones. component -> (PEFT state dict, its LoraConfig as a dict)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sdxl.build_pipeline()
    generator = torch.Generator().manual_seed(5)
    out = {}
    for component, targets in ADAPTED.items():
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets))
        # what `add_adapter` calls (transformers' own asks for a newer PEFT than diffusers')
        model = inject_adapter_in_model(config, getattr(pipe, component))
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if ".lora_" in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
        out[component] = (get_peft_model_state_dict(model), config.to_dict())
    return out


def _diffusers_lora(path: Path, trained: Trained, components: tuple[str, ...] = tuple(ADAPTED),
                    *, convert: bool = True) -> Path:
    """Saved as the SDXL training scripts save: `convert_state_dict_to_diffusers` (`lora.down`,
    `lora_linear_layer.up` names), then `save_lora_weights` (the configs go in the
    `lora_adapter_metadata` header); `convert=False` keeps PEFT's `lora_A` / `lora_B`, as newer
    scripts save."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    def layers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_state_dict_to_diffusers(state) if convert else state

    StableDiffusionXLPipeline.save_lora_weights(
        str(path.parent), weight_name=path.name, safe_serialization=True,
        **{f"{c}_lora_layers": layers(trained[c][0]) for c in components},
        **{f"{c}_lora_adapter_metadata": trained[c][1] for c in components})
    return path


def _kohya_lora(path: Path, trained: Trained) -> Path:
    """The same adapter named as kohya's sd-scripts name an SDXL one: `lora_unet_`, `lora_te1_`
    (CLIP ViT-L, with the `text_model_` transformers has since dropped), `lora_te2_` (OpenCLIP
    bigG), `lora_down` / `lora_up` and an `alpha` beside each."""
    from safetensors.torch import save_file

    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    tensors = {}
    for component, (state, config) in trained.items():
        for key, weight in state.items():
            module, ab = key.removesuffix(".weight").rsplit(".lora_", 1)
            if component == "text_encoder" and not module.startswith("text_model."):
                module = f"text_model.{module}"
            name = prefixes[component] + module.replace(".", "_")
            tensors[f"{name}.lora_{'down' if ab == 'A' else 'up'}.weight"] = weight.contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(config["lora_alpha"]))
    save_file(tensors, str(path))
    return path


def _fused(lora: str) -> tuple[DiffusionEngine, object]:
    """The engine --lora makes, and its image of CAT."""
    engine = DiffusionEngine.load(Settings(model="tiny-sdxl", lora=lora, warmup=""))
    return engine, engine.generate([CAT])[0]


@pytest.mark.parametrize(("scale", "convert"), [(1.0, True), (-0.7, False)],
                         ids=["diffusers-names", "peft-names-scaled"])
def test_diffusers_lora_with_both_text_encoders_equals_diffusers_fused(
        engine: DiffusionEngine, trained: Trained, tmp_path: Path, scale: float,
        convert: bool) -> None:
    """A `save_lora_weights` file with UNet, text_encoder and text_encoder_2 parts (alpha 8 on
    rank 4 in its header), fused by --lora, is diffusers' own pipeline after
    `load_lora_weights` and `fuse_lora`."""
    file = _diffusers_lora(tmp_path / "xl-te.safetensors", trained, convert=convert)
    fused, ours = _fused(f"{file}:{scale}")
    assert fused.info().to_dict()["loras"][0]["components"] == list(ADAPTED)
    assert diff(ours, engine.generate([CAT])[0]) > 10
    pipe = DiffusionEngine.load(Settings(model="tiny-sdxl", warmup="")).pipe
    pipe.load_lora_weights(str(file))
    pipe.fuse_lora(lora_scale=scale)
    pipe.scheduler = engine._scheduler_for(CAT)
    assert diff(ours, _diffusers_image(pipe, CAT)) <= 1


def test_each_part_of_an_sdxl_lora_counts_and_kohya_names_are_the_same_adapter(
        trained: Trained, tmp_path: Path) -> None:
    """Leaving out any part (the UNet's, either text encoder's) changes the image, so each is
    applied; the same weights under kohya's `lora_te1_` / `lora_te2_` names make the same
    image."""
    _, full = _fused(str(_diffusers_lora(tmp_path / "full.safetensors", trained)))
    for dropped in ("unet", "text_encoder", "text_encoder_2"):
        kept = tuple(c for c in ADAPTED if c != dropped)
        part = _diffusers_lora(tmp_path / f"no-{dropped}.safetensors", trained, kept)
        engine, image = _fused(str(part))
        assert engine.info().to_dict()["loras"][0]["components"] == list(kept)
        assert diff(image, full) > 10, dropped
    kohya, image = _fused(str(_kohya_lora(tmp_path / "kohya-xl.safetensors", trained)))
    assert kohya.info().to_dict()["loras"][0]["components"] == list(ADAPTED)
    assert diff(image, full) <= 1


def test_per_request_the_same_files_make_the_fused_image(trained: Trained,
                                                        tmp_path: Path) -> None:
    """--lora-dir applies both layouts' text-encoder parts per row, in both encoders: an item
    naming one is the --lora image, beside an item without it."""
    _diffusers_lora(tmp_path / "peft.safetensors", trained)
    _kohya_lora(tmp_path / "kohya.safetensors", trained)
    _, fused = _fused(f"{tmp_path / 'peft.safetensors'}:-0.7")
    engine = DiffusionEngine.load(Settings(model="tiny-sdxl", warmup="", lora_dir=str(tmp_path)))
    engine.use_loras(LoraLibrary(tmp_path))
    for name in ("peft", "kohya"):
        item = replace(CAT, loras=(LoraPick(name, -0.7),))
        assert diff(engine.generate([replace(CAT, seed=2), item])[1], fused) <= 1, name


def test_vae_from_a_folder_or_an_original_layout_file(engine: DiffusionEngine,
                                                      tmp_path: Path) -> None:
    from community import other_vae, vae_single_file

    vae = other_vae(engine.pipe.vae, seed=11)
    vae.save_pretrained(tmp_path / "fix-vae")
    file = vae_single_file(vae, tmp_path / "fix-vae.safetensors", prefix="")
    images = [DiffusionEngine.load(Settings(model="tiny-sdxl", vae=path, warmup=""))
              .generate([CAT])[0] for path in (str(tmp_path / "fix-vae"), str(file))]
    assert diff(images[0], images[1]) <= 1
    assert diff(images[0], engine.generate([CAT])[0]) > 10


def test_the_step_core_decodes_an_fp16_vae_in_float32_as_sdxl_does() -> None:
    """SDXL's VAE overflows in fp16: the pipeline decodes in float32 when `force_upcast` says
    so, and the step core does the same for the SDXL family (not for SD 1.x), leaving the
    VAE in fp16 after."""
    from batchserve.engines.stepwise import _decode
    from batchserve.engines.tiny_sdxl import vae as tiny_vae

    vae = tiny_vae().to(torch.float16)
    seen: list[torch.dtype] = []
    decode = vae.decode
    vae.decode = lambda z, **kw: (seen.append(z.dtype), decode(z, **kw))[1]  # type: ignore[method-assign]
    latents = torch.zeros(1, 4, 8, 8, dtype=torch.float16)
    for upcast in (True, False):
        # some CPU builds have no fp16 conv: the dtype the VAE was handed is the point
        with contextlib.suppress(RuntimeError):
            _decode(vae, latents, upcast=upcast)
        assert vae.dtype == torch.float16
    assert seen == [torch.float32, torch.float16]
