"""`generic`: any other diffusers text-to-image pipeline (FLUX.1, SD3/3.5, PixArt, Sana, ...),
run whole by its own `__call__` (`engines.generic`). What can be known of it without torch lives
here, so a `--role api` process validates requests for it: its sizes, its samplers (from its
scheduler's kind), and whether its pipeline draws each item's noise from that item's generator.

The seed guarantee (an item's image is the same alone or among strangers) needs one generator per
item: a pipeline in `LIST_GENERATORS` draws its initial noise with diffusers' `randn_tensor` over
the whole batch's shape, which takes each item's slice from that item's generator, and pads every
prompt to one fixed length. Any other pipeline is called once per item inside a batch: it still
shares the batching key, the queue and the worker, but gains nothing from batching (say so in
/v1/info, `engine.batched: false`), rather than draw a batch's noise from one generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...samplers import DEFAULT_SAMPLER, FLOW_SAMPLERS, NATIVE, SAMPLERS
from ...settings import SettingsError
from .base import FAMILY_SIZES, Sizes
from .detect import hub_cached_json, model_index, read_json

if TYPE_CHECKING:
    from ...settings import Settings

LIST_GENERATORS = frozenset({
    # read in diffusers 0.42: `prepare_latents` calls randn_tensor(shape, generator=generator)
    "FluxPipeline", "ChromaPipeline", "StableDiffusion3Pipeline", "PixArtAlphaPipeline",
    "PixArtSigmaPipeline", "SanaPipeline", "SanaSprintPipeline", "AuraFlowPipeline",
    "LuminaPipeline", "Lumina2Pipeline", "CogView3PlusPipeline", "CogView4Pipeline",
    "QwenImagePipeline", "HiDreamImagePipeline", "KolorsPipeline",
})
"""Pipelines whose whole batch draws each item's noise from that item's generator."""
REFINERS = frozenset({"StableDiffusionXLImg2ImgPipeline"})
"""Pipelines detected as generic that are not text-to-image models (the SDXL refiner)."""
IMG2IMG = frozenset({"FluxPipeline", "StableDiffusion3Pipeline", "QwenImagePipeline"})
"""Pipelines whose diffusers img2img sibling (`AutoPipelineForImage2Image`) encodes each item's
init image with that item's generator and starts at the step `get_timesteps` gives: served
whole for img2img (no inpainting)."""

SIZES = FAMILY_SIZES["generic"]
PRESET_SIZES = {
    "tiny-flux": Sizes(default=(256, 256), presets=((256, 256), (384, 256), (256, 384),
                                                    (512, 512)), multiple_of=16),
}
"""Presets built in code draw noise at toy width: a small default keeps CPU runs quick."""

FLOW = "flow"
CLASSIC = "classic"
OTHER = "other"
_CLASSIC_SCHEDULERS = frozenset({
    "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DDIMScheduler", "HeunDiscreteScheduler",
    "PNDMScheduler", "DDPMScheduler", "LMSDiscreteScheduler",
})
PRESET_PIPELINES = {"tiny-flux": "FluxPipeline"}
PRESET_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-flux": ("FlowMatchEulerDiscreteScheduler", {}),
}


def scheduler_kind(class_name: str | None, config: Mapping[str, Any] | None = None) -> str:
    """`FLOW` (flow-matching Euler), `CLASSIC` (a noise-prediction scheduler: every classic
    sampler can be built from its config) or `OTHER` (served only as shipped). Unknown (a hub id
    not in the local cache): `FLOW`, what today's generic pipelines mostly are; the engine checks
    it against the loaded scheduler at start."""
    config = config or {}
    if class_name is None or class_name == "FlowMatchEulerDiscreteScheduler":
        return FLOW
    flowing = config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"
    return CLASSIC if class_name in _CLASSIC_SCHEDULERS and not flowing else OTHER


def samplers_of(kind: str) -> tuple[str, ...]:
    return {FLOW: FLOW_SAMPLERS, CLASSIC: SAMPLERS}.get(kind, (NATIVE,))


def pipeline_on_disk(model: str) -> str | None:
    """The pipeline class of a preset, a diffusers folder or a cached hub id, without torch."""
    if model in PRESET_PIPELINES:
        return PRESET_PIPELINES[model]
    name = model_index(model).get("_class_name")
    return str(name) if name is not None else None


def sizes_of(model: str) -> Sizes:
    """The sizes a generic `model` takes: a preset's own; multiples of 32 with a deep-compression
    VAE (Sana's `AutoencoderDC`, 32x); else multiples of 16."""
    if model in PRESET_SIZES:
        return PRESET_SIZES[model]
    vae = model_index(model).get("vae")
    if isinstance(vae, list) and len(vae) == 2 and vae[1] == "AutoencoderDC":
        return Sizes(SIZES.default, tuple(s for s in SIZES.presets
                                          if not s[0] % 32 and not s[1] % 32), multiple_of=32)
    return SIZES


def scheduler_on_disk(model: str) -> tuple[str | None, dict[str, Any]]:
    """The scheduler class and config of a preset, a diffusers folder or a cached hub id (no
    download), without torch; (None, {}) when nothing here tells."""
    if model in PRESET_SCHEDULERS:
        preset, settings = PRESET_SCHEDULERS[model]
        return preset, dict(settings)
    entry = model_index(model).get("scheduler")
    name = str(entry[1]) if isinstance(entry, list) and len(entry) == 2 else None
    folder = Path(model)
    config = (read_json(folder / "scheduler" / "scheduler_config.json") if folder.is_dir()
              else None if folder.exists()
              else hub_cached_json(model, "scheduler/scheduler_config.json"))
    return name, config or {}


def served_samplers(model: str, scheduler: str) -> tuple[tuple[str, ...], str]:
    """(the samplers a generic `model` can use, the default one): `--scheduler` when it is one
    of them; its default (never set) gives way to the model's first; any other is refused."""
    samplers = samplers_of(scheduler_kind(*scheduler_on_disk(model)))
    if scheduler in samplers:
        return samplers, scheduler
    if scheduler == DEFAULT_SAMPLER:
        return samplers, samplers[0]
    raise SettingsError(f"--scheduler={scheduler}: --model={model} can use "
                        f"{', '.join(samplers)}")


_UNSUPPORTED = (
    ("refiner", "the refiner is for SDXL"),
    ("lora", "LoRA fused at load is for SD 1.x and SDXL"),
    ("vae", "a replacement VAE is for SD 1.x and SDXL"),
    ("embeddings", "textual-inversion embeddings are for SD 1.x and SDXL"),
    ("lora_dir", "per-request LoRA is served for SD 1.x and SDXL"),
)


def check_settings(settings: Settings) -> None:
    """What a generic model cannot do, each one start-up line naming the flag."""
    if pipeline_on_disk(settings.model) in REFINERS:
        raise SettingsError(f"--model={settings.model}: an SDXL refiner is not a text-to-image "
                            "model; serve an SDXL base with --refiner naming it")
    if settings.flush_policy == "continuous":
        raise SettingsError(
            f"--flush-policy=continuous: --model={settings.model} is a generic diffusers "
            "pipeline, which runs whole batches only (no step-wise engine); use "
            "--flush-policy=deadline or eager")
    for name, why in _UNSUPPORTED:
        if getattr(settings, name) is not None:
            raise SettingsError(f"--{name.replace('_', '-')}: not with a generic model ({why}); "
                                f"--model={settings.model} is a generic diffusers pipeline")
    if settings.attention == "default":
        raise SettingsError("--attention=default: not with a generic model (its attention "
                            "processors are its own); use auto or sdpa")
    if settings.clip_skip != 1:
        raise SettingsError(f"--clip-skip={settings.clip_skip}: not with a generic model "
                            "(its pipeline encodes prompts itself)")
