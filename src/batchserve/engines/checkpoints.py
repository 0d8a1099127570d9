"""Community model files, as people run Stable Diffusion: a single-file checkpoint, a replacement
VAE, LoRA fused into the weights at load, textual-inversion embeddings.

Loading is diffusers' own (`from_single_file`, `load_lora_weights` + `fuse_lora`,
`load_textual_inversion`); this module checks paths first and turns any failure into a
`SettingsError` naming the setting and the file, so a bad file stops the start with one readable
line instead of a traceback from deep inside diffusers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..settings import Settings, SettingsError

log = logging.getLogger("batchserve.engine")

# Pickle can run code when loaded; diffusers unpickles with `weights_only=True`, but a model file
# from the internet is still the classic way in, so these need an explicit --allow-pickle.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_SINGLE_FILE_PIPELINES = {"sd1": ("StableDiffusionPipeline", "SD 1.x"),
                          "sdxl": ("StableDiffusionXLPipeline", "SDXL")}


@dataclass(frozen=True, slots=True)
class Embedding:
    token: str
    path: str
    vectors: int


@dataclass(frozen=True, slots=True)
class Lora:
    path: str
    scale: float
    components: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Addons:
    """What was loaded on top of the base model, for `/v1/info` and the prompt encoder."""

    vae: str | None = None
    loras: tuple[Lora, ...] = ()
    embeddings: tuple[Embedding, ...] = ()

    def describe(self) -> dict[str, Any]:
        return {
            "vae": self.vae,
            "loras": [{"path": x.path, "scale": x.scale, "components": list(x.components)}
                      for x in self.loras],
            "embeddings": [{"token": e.token, "path": e.path, "vectors": e.vectors}
                           for e in self.embeddings],
        }

    def expansions(self) -> dict[str, str]:
        """Multi-vector embeddings: their token -> the tokens of all their vectors."""
        return {e.token: " ".join([e.token] + [f"{e.token}_{i}" for i in range(1, e.vectors)])
                for e in self.embeddings if e.vectors > 1}


def checked_file(setting: str, path: str | Path, *, allow_pickle: bool,
                 what: str = "file") -> Path:
    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"{setting}={str(path)!r}: no such {what}")
    suffix = file.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise SettingsError(
            f"{setting}={str(path)!r}: expected a {', '.join(WEIGHT_SUFFIXES)} file"
        )
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise SettingsError(
            f"{setting}={str(path)!r}: {suffix} files are Python pickles, which can run code "
            "when loaded; use the .safetensors version, or pass --allow-pickle if you trust "
            "where the file came from"
        )
    return file


def _reason(exc: BaseException, limit: int = 300) -> str:
    """The head of a library error: enough to act on, without the wall of text (a first line
    ending in ':' announces the line that says what is wrong, so that one comes too)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    head = " ".join(lines[:2] if lines and lines[0].endswith(":") else lines[:1])
    if len(head) > limit:
        head = head[:limit] + "..."
    return f"{type(exc).__name__}: {head}" if head else type(exc).__name__


def load_single_file(settings: Settings, torch_dtype: torch.dtype, family: str = "sd1") -> Any:
    """An original-layout checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.transformer.*`, SDXL's `conditioner.embedders.*`); `--model-config`
    names the diffusers layout to fill."""
    import diffusers

    name, kind = _SINGLE_FILE_PIPELINES[family]
    return _from_single_file(getattr(diffusers, name), "--model", settings.model,
                             settings.model_config, f"{kind} checkpoint",
                             allow_pickle=settings.allow_pickle, what="checkpoint file",
                             torch_dtype=torch_dtype)


def load_single_refiner(path: str, config: str | None, allow_pickle: bool,
                        **shared: Any) -> Any:
    """An SDXL refiner file in the original layout (Stability's `sd_xl_refiner_1.0`:
    `model.diffusion_model.*`, OpenCLIP bigG as `conditioner.embedders.0.model.*`) with the
    `shared` components of the base; `config` (`--refiner-config`) names the diffusers layout
    to fill, without which diffusers fetches the refiner's from the hub."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    return _from_single_file(StableDiffusionXLImg2ImgPipeline, "--refiner", path, config,
                             "SDXL refiner", allow_pickle=allow_pickle, **shared)


def _from_single_file(pipeline: Any, setting: str, path: str, config: str | None, kind: str,
                      *, allow_pickle: bool, what: str = "file", **kwargs: Any) -> Any:
    """`pipeline.from_single_file` of `setting`'s checked file, `config` (the `-config`
    setting beside it) naming the diffusers layout; a failure is one line naming both."""
    file = checked_file(setting, path, allow_pickle=allow_pickle, what=what)
    try:
        return pipeline.from_single_file(
            str(file), config=config, **kwargs,
            # A local config folder means offline: never reach for the hub behind its back.
            local_files_only=config is not None and Path(config).is_dir(),
        )
    except Exception as exc:
        hint = "" if config else f"; {setting}-config can name its diffusers folder or hub id"
        raise SettingsError(
            f"{setting}={path!r}: cannot load it as a single-file {kind} ({_reason(exc)}){hint}"
        ) from None


def check_paths(settings: Settings) -> None:
    """Every named file exists and may be loaded: checked before minutes of model loading."""
    model = settings.model
    if model.lower().endswith(WEIGHT_SUFFIXES):
        checked_file("--model", model, allow_pickle=settings.allow_pickle, what="checkpoint file")
    refiner = settings.refiner
    if refiner and refiner.lower().endswith(WEIGHT_SUFFIXES):
        checked_file("--refiner", refiner, allow_pickle=settings.allow_pickle)
    if settings.vae and not Path(settings.vae).is_dir():
        checked_file("--vae", settings.vae, allow_pickle=settings.allow_pickle)
    for path, _ in settings.lora_specs():
        checked_file("--lora", path, allow_pickle=settings.allow_pickle)
    if settings.embeddings:
        for file in _embedding_files("--embeddings", settings.embeddings):
            checked_file("--embeddings", file, allow_pickle=settings.allow_pickle)


def apply_addons(pipe: Any, settings: Settings) -> Addons:
    """VAE, then LoRA, then embeddings, each checked, on the pipeline already on its device
    (fusing is faster there) and before any tuning (compiling) sees the weights."""
    vae = _replace_vae(pipe, settings) if settings.vae else None
    loras = tuple(
        _fuse_lora(pipe, path, scale, index, settings.allow_pickle)
        for index, (path, scale) in enumerate(settings.lora_specs())
    )
    embeddings = _load_embeddings(pipe, settings) if settings.embeddings else ()
    _check_clip_skip(pipe, settings.clip_skip)
    return Addons(vae, loras, embeddings)


def _replace_vae(pipe: Any, settings: Settings) -> str:
    from diffusers import AutoencoderKL

    path = str(settings.vae)
    current = pipe.vae
    try:
        if Path(path).is_dir():
            # A VAE folder, or a whole pipeline folder whose vae/ we take.
            sub = "vae" if (Path(path) / "vae" / "config.json").is_file() else None
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=current.dtype)
        else:
            file = checked_file("--vae", path, allow_pickle=settings.allow_pickle)
            vae = _vae_from_file(file, current.config)
    except SettingsError:
        raise
    except Exception as exc:
        raise SettingsError(f"--vae={path!r}: cannot load it as a VAE ({_reason(exc)})") from None
    if _vae_shape(vae.config) != _vae_shape(current.config):
        raise SettingsError(
            f"--vae={path!r}: does not fit this model (latent channels, scale factor "
            f"{_vae_shape(vae.config)} where the model has {_vae_shape(current.config)})"
        )
    pipe.register_modules(vae=vae.to(device=current.device, dtype=current.dtype))
    return path


def _vae_shape(config: Any) -> tuple[int, int]:
    return int(config.latent_channels), 2 ** (len(config.block_out_channels) - 1)


def _vae_from_file(file: Path, config: Any) -> Any:
    """A single-file VAE in the original layout (what people download) or the diffusers one,
    with the architecture of the VAE it replaces."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from diffusers.models.model_loading_utils import load_state_dict

    state = load_state_dict(str(file))
    while "state_dict" in state:
        state = state["state_dict"]
    if not any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        state = convert_ldm_vae_checkpoint(state, config)
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(state, strict=True)
    return vae


def _fuse_lora(pipe: Any, path: str, scale: float, index: int, allow_pickle: bool) -> Lora:
    """Loads one LoRA, fuses it at its scale and drops the adapter layers again: the served
    model is a plain model with changed weights, so batching and speed are as without LoRA."""
    file = checked_file("--lora", path, allow_pickle=allow_pickle)
    name = f"lora{index}"
    try:
        pipe.load_lora_weights(str(file), adapter_name=name)
    except Exception as exc:
        raise SettingsError(
            f"--lora={path!r}: does not fit this model ({_reason(exc)})"
        ) from None
    components = tuple(c for c, names in pipe.get_list_adapters().items() if name in names)
    if not components:
        pipe.unload_lora_weights()
        raise SettingsError(f"--lora={path!r}: no layer of this model matches its weights")
    pipe.fuse_lora(components=list(components), lora_scale=scale, adapter_names=[name])
    pipe.unload_lora_weights()
    return Lora(path, scale, components)


def _embedding_files(setting: str, path: str) -> list[Path]:
    root = Path(path)
    if root.is_dir():
        files = sorted(f for f in root.iterdir()
                       if f.is_file() and f.suffix.lower() in WEIGHT_SUFFIXES)
        if not files:
            raise SettingsError(f"{setting}={path!r}: no {', '.join(WEIGHT_SUFFIXES)} files in it")
        return files
    if not root.exists():
        raise SettingsError(f"{setting}={path!r}: no such file or folder")
    return [root]


def _load_embeddings(pipe: Any, settings: Settings) -> tuple[Embedding, ...]:
    loaded: list[Embedding] = []
    for file in _embedding_files("--embeddings", str(settings.embeddings)):
        checked_file("--embeddings", file, allow_pickle=settings.allow_pickle)
        token = file.stem
        if any(e.token.lower() == token.lower() for e in loaded):
            raise SettingsError(f"--embeddings: {file.name}: a second embedding named {token!r}")
        before = len(pipe.tokenizer)
        try:
            if getattr(pipe, "text_encoder_2", None) is not None:
                _load_sdxl_embedding(pipe, file, token)
            else:
                pipe.load_textual_inversion(str(file), token=token)
        except SettingsError:
            raise
        except Exception as exc:
            raise SettingsError(
                f"--embeddings: {file.name}: not a textual-inversion embedding for this model "
                f"({_reason(exc)})"
            ) from None
        loaded.append(Embedding(token, str(file), len(pipe.tokenizer) - before))
    return tuple(loaded)


def _load_sdxl_embedding(pipe: Any, file: Path, token: str) -> None:
    """SDXL embeddings are one file with a tensor per text encoder: `clip_l` (the first, CLIP
    ViT-L) and `clip_g` (the second, OpenCLIP bigG), each loaded into its own encoder."""
    from diffusers.models.model_loading_utils import load_state_dict

    state = load_state_dict(str(file))
    missing = [name for name in ("clip_l", "clip_g") if name not in state]
    if missing:
        raise SettingsError(
            f"--embeddings: {file.name}: not an SDXL embedding (no {' or '.join(missing)} "
            f"tensor; it has {', '.join(sorted(state)[:4]) or 'none'})"
        )
    pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)


def _check_clip_skip(pipe: Any, clip_skip: int) -> None:
    layers = int(pipe.text_encoder.config.num_hidden_layers)
    if getattr(pipe, "text_encoder_2", None) is not None:
        layers -= 1  # SDXL counts from the penultimate layer: clip skip 1 is that one
    if clip_skip > layers:
        raise SettingsError(
            f"--clip-skip={clip_skip}: this model's text encoder has only {layers} layers"
        )


def log_addons(addons: Addons, settings: Settings) -> None:
    if addons.vae:
        log.info("vae %s replaces the model's", addons.vae)
    for lora in addons.loras:
        log.info("lora %s fused at scale %g into %s", lora.path, lora.scale,
                 ", ".join(lora.components))
    for e in addons.embeddings:
        log.info("embedding %s (%d vector%s) from %s", e.token, e.vectors,
                 "" if e.vectors == 1 else "s", e.path)
    log.info("prompts: long prompts %s, clip skip %d", settings.long_prompts, settings.clip_skip)


def describe(addons: Addons, settings: Settings) -> dict[str, Any]:
    return {**addons.describe(), "long_prompts": settings.long_prompts,
            "clip_skip": settings.clip_skip}

