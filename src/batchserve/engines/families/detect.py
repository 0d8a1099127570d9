"""Which family a `--model` is, read from what is on disk without torch: a diffusers folder's
`model_index.json` (`_class_name`), a single file's tensor names (the safetensors header only),
a preset's name. `resolve` applies `--model-family` and turns a mismatch into one start-up line."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...samplers import SAMPLERS
from ...settings import SettingsError
from .base import FAMILY_SIZES, Sizes

if TYPE_CHECKING:
    from ...settings import Settings

FAMILIES = ("sd1", "sdxl", "generic")
SERVED = FAMILIES
"""Families with an engine: sd1 and sdxl in the step core, generic whole (`engines.generic`)."""

PRESET_FAMILIES = {"tiny": "sd1", "tiny-inpaint": "sd1", "sd15": "sd1",
                   "tiny-sdxl": "sdxl", "sdxl": "sdxl", "tiny-flux": "generic"}

_PIPELINES = {
    # The same components saved from another of the family's pipelines are the family's: an
    # inpainting checkpoint (a 9-channel UNet, which the engine reads) is served by the step
    # core like any other. StableDiffusionXLImg2ImgPipeline is left out: it is how the SDXL
    # refiner is published (no first text encoder), which goes in --refiner.
    "StableDiffusionPipeline": "sd1",  # SD 1.x and 2.x share it
    "StableDiffusionImg2ImgPipeline": "sd1",
    "StableDiffusionInpaintPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
}

# A tensor name that only this family's original-layout checkpoints have, first match wins.
_KEY_PREFIXES = (
    ("conditioner.embedders.1.model.transformer.", "sdxl"),  # OpenCLIP bigG, SDXL base
    ("conditioner.embedders.", "generic"),  # the SDXL refiner: bigG alone
    ("double_blocks.", "generic"),  # FLUX
    ("model.diffusion_model.double_blocks.", "generic"),
    ("model.diffusion_model.joint_blocks.", "generic"),  # SD3
    ("cond_stage_model.", "sd1"),  # CLIP ViT-L (1.x) or OpenCLIP ViT-H (2.x)
    ("model.diffusion_model.input_blocks.", "sd1"),
)


def detect(model: str, model_config: str | None = None) -> str | None:
    """The family of `model`, or None when nothing on this machine tells (a hub id not in the
    local cache, a pickled single file without `--model-config`)."""
    if model in PRESET_FAMILIES:
        return PRESET_FAMILIES[model]
    path = Path(model)
    if path.is_file():
        if path.suffix.lower() == ".safetensors":
            found = _from_keys(path)
            if found is not None:
                return found
        return detect(model_config) if model_config else None
    return _family_of(model_index(model))


def _family_of(index: dict[str, Any] | None) -> str | None:
    """The family a `model_index.json` names by its `_class_name` (None: it names none)."""
    name = None if index is None else index.get("_class_name")
    return None if name is None else _PIPELINES.get(str(name), "generic")


def served_family(model: str, asked: str = "auto", model_config: str | None = None) -> str:
    """The family whose sizes and defaults the doors use, never raising (the engine's start
    says what is wrong): the one asked for, else the detected one, else sd1 (sim, fakes)."""
    if asked in SERVED:
        return asked
    found = detect(model, model_config)
    return found if found in SERVED else "sd1"


def resolve(asked: str, model: str, model_config: str | None = None) -> str:
    """The family to serve: detected under `auto`, else the one asked for, which must agree
    with what is detected. A hub id not in the local cache is told by its `model_index.json`
    from the hub; a pickled single file without `--model-config` is taken as sd1 (nothing
    readable without unpickling tells, and SD 1.x is what such files mostly are)."""
    if asked not in ("auto", *FAMILIES):
        raise SettingsError(f"--model-family={asked!r}: must be one of auto, {', '.join(FAMILIES)}")
    found = detect(model, model_config)
    if found is None and _hub_id(model):
        found, reason = _fetched_family(model)
        if found is None and asked == "auto":
            raise SettingsError(
                f"--model={model}: cannot tell its family: no model_index.json in the local "
                f"cache or on the hub ({reason}); set --model-family to sd1, sdxl or generic")
    if asked == "auto":
        family = found or "sd1"
    elif found is not None and found != asked:
        raise SettingsError(
            f"--model-family={asked}: --model={model!r} is a {found} model; "
            f"drop --model-family or set it to {found}"
        )
    else:
        family = asked
    if family == "generic" and Path(model).is_file():
        raise SettingsError(
            f"--model={model}: a single-file checkpoint of a generic pipeline (not SD 1.x/2.x or "
            "SDXL) cannot be loaded; serve its diffusers folder or hub id (an SDXL refiner "
            "file goes in --refiner, beside an SDXL base)"
        )
    return family


def _hub_id(model: str) -> bool:
    """A hub id, not a path: `owner/name`, nothing on disk there, not a preset."""
    return (model not in PRESET_FAMILIES and model.count("/") == 1
            and not model.startswith((".", "/", "~")) and not Path(model).exists())


@functools.lru_cache(maxsize=16)
def _fetched_family(repo: str) -> tuple[str | None, str]:
    """(the family, "") of a hub id from its `model_index.json` downloaded into the hub's cache
    (a few hundred bytes; loading the model fetches the rest), or (None, why not). Once per
    repo: the doors' checks read the cache afterwards, and an unreachable hub costs its
    retries once."""
    try:
        from huggingface_hub import hf_hub_download

        index = read_json(Path(hf_hub_download(repo, "model_index.json")))
    except Exception as exc:  # offline, no such repo, gated without a token: say which
        first = str(exc).splitlines()[0].split(". ")[0][:200] if str(exc) else ""
        return None, f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    family = _family_of(index)
    return (family, "") if family else (None, "its model_index.json names no pipeline class")


def served_sizes(model: str, asked: str = "auto", model_config: str | None = None) -> Sizes:
    """The sizes the doors offer and check: its family's; a generic model's own
    (`generic.sizes_of`: tiny-flux small, Sana multiples of 32)."""
    family = served_family(model, asked, model_config)
    if family == "generic":
        from .generic import sizes_of

        return sizes_of(model)
    return FAMILY_SIZES[family]


def _from_keys(file: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:
            keys = list(f.keys())
    except Exception:  # not readable as safetensors: the loader says why, naming --model
        return None
    for prefix, family in _KEY_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            return family
    return None


def model_index(model: str) -> dict[str, Any]:
    """`model_index.json` of a diffusers folder or a cached hub id ({} when none)."""
    folder = Path(model)
    if folder.is_dir():
        return read_json(folder / "model_index.json") or {}
    return {} if folder.exists() else hub_cached_json(model, "model_index.json") or {}


def read_json(file: Path) -> dict[str, Any] | None:
    """A JSON object from `file`; None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def hub_cached_json(repo: str, name: str) -> dict[str, Any] | None:
    """A hub id's file `name` when already in the local cache (never a download here:
    loading the model downloads what it needs)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, name)
    except Exception:  # not a valid repo id
        return None
    return read_json(Path(cached)) if isinstance(cached, str) else None


def served_samplers(model: str, scheduler: str, asked: str = "auto",
                    model_config: str | None = None) -> tuple[tuple[str, ...], str]:
    """(the samplers requests may name, the default one) for `--model` and `--scheduler`:
    SD 1.x and SDXL take the classic samplers; a generic model those of its scheduler's kind
    (`generic.served_samplers`). A `--scheduler` the model cannot use is one start-up line."""
    if served_family(model, asked, model_config) == "generic":
        from .generic import served_samplers as generic_samplers

        return generic_samplers(model, scheduler)
    if scheduler not in SAMPLERS:
        raise SettingsError(f"--scheduler={scheduler}: --model={model} can use "
                            f"{', '.join(SAMPLERS)}")
    return SAMPLERS, scheduler


def check_refiner(settings: Settings, family: str) -> None:
    """`--refiner` needs an SDXL base (the simulated engine has none)."""
    if settings.refiner is not None and family != "sdxl":
        what = "the simulated engine" if family == "sim" else family
        raise SettingsError(f"--refiner: the refiner needs an SDXL base model; --model "
                            f"{settings.model} is {what}")


def check_start(settings: Settings) -> None:
    """What can be judged of the model before the server starts, without torch: its family
    against `--model-family`, its samplers against `--scheduler`, a refiner against the
    family, and what a generic model cannot do (`generic.check_settings`). Each one line
    naming the flag."""
    if settings.model == "sim":
        check_refiner(settings, "sim")
        return
    family = resolve(settings.model_family, settings.model, settings.model_config)
    check_refiner(settings, family)
    served_samplers(settings.model, settings.scheduler, family, settings.model_config)
    if family == "generic" and settings.role != "api":
        from .generic import check_settings

        check_settings(settings)
