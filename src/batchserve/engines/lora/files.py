"""LoRA files as people download them, read into per-layer (down, up) pairs for the served model.

Two layouts are read: kohya / A1111 (`lora_unet_<module>.lora_down.weight`, `.lora_up.weight`,
`.alpha`; `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders) and diffusers' own
(`unet.<module>.lora_A.weight`, the older `...to_q_lora.down.weight`, `text_encoder.` ...; LoRA
alphas in the `lora_adapter_metadata` header that `save_lora_weights` writes). Key names are
translated by diffusers' own converters (`lora_state_dict`, which maps kohya names and SDXL's
sgm block numbers, then the PEFT renames `load_lora_weights` applies), so a file means here what
it means to `load_lora_weights`.

The translation runs on the header alone: every tensor stands in as a `_Ref` (key and shape)
until `load` reads the few it needs, so a folder of large files is judged in milliseconds and a
file that does not fit the model is refused with its reason without reading its weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The components a LoRA may touch, by the prefix diffusers gives them.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' `LORA_ADAPTER_METADATA_KEY`
_LYCORIS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", ".diff", "oft_", ".w_norm", "dora_scale",
            "lora_magnitude_vector", "lora_mid")


class Unusable(ValueError):
    """The file is no LoRA this server can apply per row to this model; the message says why."""


@dataclass(frozen=True, slots=True)
class LayerShape:
    """What a LoRA must fit at one layer: a Linear (`kernel` None) or a Conv2d."""

    in_features: int
    out_features: int
    kernel: tuple[int, int] | None = None


Signature = Mapping[str, Mapping[str, LayerShape]]
"""component -> module name -> shape, for every Linear and Conv2d of the served model."""


def signature(components: Mapping[str, torch.nn.Module]) -> dict[str, dict[str, LayerShape]]:
    """The model's layers a LoRA may touch, read once at load (plain data from then on)."""
    out: dict[str, dict[str, LayerShape]] = {}
    for component, model in components.items():
        layers: dict[str, LayerShape] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                layers[name] = LayerShape(module.in_features, module.out_features)
            elif isinstance(module, torch.nn.Conv2d) and module.groups == 1:
                kh, kw = module.kernel_size
                layers[name] = LayerShape(module.in_channels, module.out_channels, (kh, kw))
        out[component] = layers
    return out


@dataclass(frozen=True, slots=True)
class _Ref:
    """A tensor of the file, by key and shape, not read yet; `alpha` rides along on a down
    weight (kohya keeps it beside, and diffusers' converter would rename it apart)."""

    key: str
    shape: tuple[int, ...]
    alpha: float | None = None


@dataclass(frozen=True, slots=True)
class LayerLora:
    """One layer's LoRA: `delta(x) = (alpha / rank) * up(down(x))`."""

    component: str
    module: str
    down: str  # the file's keys
    up: str
    rank: int
    alpha: float
    kernel: tuple[int, int] | None  # the down weight's kernel on a Conv2d; None on a Linear

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True, slots=True)
class Layout:
    """What `inspect` found: every layer the file touches, checked against the model."""

    layers: tuple[LayerLora, ...]
    parameters: int

    @property
    def components(self) -> tuple[str, ...]:
        found = {layer.component for layer in self.layers}
        return tuple(c for c in COMPONENTS if c in found)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers)


@dataclass(frozen=True, slots=True)
class Delta:
    """One layer's weights ready for the per-row math: `down` already carries alpha / rank."""

    down: torch.Tensor  # [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]

    @property
    def nbytes(self) -> int:
        return self.down.nbytes + self.up.nbytes


AdapterWeights = dict[str, dict[str, Delta]]
"""component -> module name -> its delta."""


def inspect(path: Path, model: Signature, *, unet_config: Any = None) -> Layout:
    """Reads the header of a `.safetensors` LoRA and maps it onto `model`; raises `Unusable`
    naming the first thing that does not fit. `unet_config` lets kohya SDXL files (sgm block
    numbers) be mapped as diffusers maps them."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise Unusable("only .safetensors LoRA files are read per request (pickle files can "
                       "run code)")
    try:
        with safe_open(str(path), framework="pt") as file:
            refs: dict[str, Any] = {}
            alphas: dict[str, float] = {}
            for key in file.keys():  # noqa: SIM118 (safe_open is no dict)
                shape = tuple(file.get_slice(key).get_shape())
                if key.endswith(".alpha"):
                    alphas[key] = float(file.get_tensor(key).float().reshape(-1)[0])
                else:
                    refs[key] = _Ref(key, shape)
            metadata = file.metadata() or {}
    except Unusable:
        raise
    except Exception as exc:
        raise Unusable(f"not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    return _layout(refs, alphas, metadata, model, unet_config)


def _layout(refs: dict[str, Any], alphas: dict[str, float], metadata: Mapping[str, str],
            model: Signature, unet_config: Any) -> Layout:
    if not refs:
        raise Unusable("no tensors in it")
    other = next((k for k in refs if any(mark in k for mark in _LYCORIS)), None)
    if other is not None:
        raise Unusable(f"{other!r}: LyCORIS / DoRA layers (LoHa, LoKr, DoRA) are not LoRA; "
                       "only plain LoRA is applied per row")
    converted = _to_diffusers(refs, alphas, unet_config)
    config = _metadata(metadata)
    layers: list[LayerLora] = []
    for component in COMPONENTS:
        own = {k.removeprefix(f"{component}."): v for k, v in converted.items()
               if k.startswith(f"{component}.")}
        if not own:
            continue
        if component not in model:
            raise Unusable(f"it has {component} layers, which this model does not have "
                           "(a LoRA made for another model family)")
        layers += _component(component, _to_peft(component, own), model[component],
                             config.get(component))
    stray = next((k for k in converted if not k.startswith(tuple(f"{c}." for c in COMPONENTS))),
                 None)
    if stray is not None:
        raise Unusable(f"{stray!r}: not a layer of a UNet or text encoder")
    if not layers:
        raise Unusable("no LoRA layers in it")
    parameters = sum(math.prod(refs[layer.down].shape) + math.prod(refs[layer.up].shape)
                     for layer in layers)
    return Layout(tuple(layers), parameters)


def _to_diffusers(refs: dict[str, Any], alphas: dict[str, float], unet_config: Any
                  ) -> dict[str, Any]:
    """diffusers' `lora_state_dict` on stand-ins: kohya names (and SDXL's sgm blocks) become
    `unet.` / `text_encoder.` / `text_encoder_2.` names; diffusers' names pass as they are."""
    from diffusers import StableDiffusionPipeline

    state = dict(refs)
    for key, alpha in alphas.items():
        stem = key.removesuffix(".alpha")
        down = next((f"{stem}{s}" for s in (".lora_down.weight", ".lora_A.weight",
                                             ".lora.down.weight") if f"{stem}{s}" in state), None)
        if down is None:
            raise Unusable(f"{key!r}: an alpha without its LoRA weights")
        state[down] = _Ref(state[down].key, state[down].shape, alpha)
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(state, unet_config=unet_config)
    except Unusable:
        raise
    except Exception as exc:
        raise Unusable(f"diffusers cannot read its keys ({_head(exc)})") from None
    return dict(converted)


def _to_peft(component: str, state: dict[str, Any]) -> dict[str, Any]:
    """The renames `load_lora_weights` applies before PEFT sees the keys."""
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    try:
        if component == "unet":
            if "lora_A" not in next(iter(state)):
                return dict(convert_unet_state_dict_to_peft(state))
            return state
        return dict(convert_state_dict_to_peft(convert_state_dict_to_diffusers(state)))
    except Exception as exc:
        raise Unusable(f"diffusers cannot read its {component} keys ({_head(exc)})") from None


def _component(component: str, state: dict[str, Any], layers: Mapping[str, LayerShape],
               config: Any) -> list[LayerLora]:
    found: list[LayerLora] = []
    downs = {k.removesuffix(".lora_A.weight"): v for k, v in state.items()
             if k.endswith(".lora_A.weight")}
    ups = {k.removesuffix(".lora_B.weight"): v for k, v in state.items()
           if k.endswith(".lora_B.weight")}
    extra = sorted(set(state) - {f"{m}.lora_A.weight" for m in downs}
                   - {f"{m}.lora_B.weight" for m in ups})
    if extra:
        raise Unusable(f"{component}: {extra[0]!r} is no LoRA down/up weight (biases and "
                       "other extras are not applied per row)")
    for module in sorted(downs):
        if module not in ups:
            raise Unusable(f"{component}.{module}: a down weight without its up weight")
        name = _module_name(module, layers)
        if name is None:
            raise Unusable(f"{component}.{module}: no such layer in this model")
        down, up = downs[module], ups[module]
        kernel = _check_fit(f"{component}.{module}", down.shape, up.shape, layers[name])
        rank = down.shape[0]
        alpha = _alpha(down.alpha, rank, config, module)
        found.append(LayerLora(component, name, down.key, up.key, rank, alpha, kernel))
    missing = sorted(set(ups) - set(downs))
    if missing:
        raise Unusable(f"{component}.{missing[0]}: an up weight without its down weight")
    return found


def _module_name(module: str, layers: Mapping[str, LayerShape]) -> str | None:
    if module in layers:
        return module
    # transformers >= 5.6 flattened CLIPTextModel; files name its layers `text_model.` still
    # (diffusers strips it the same way).
    short = module.removeprefix("text_model.")
    return short if short in layers else None


def _check_fit(label: str, down: tuple[int, ...], up: tuple[int, ...],
               layer: LayerShape) -> tuple[int, int] | None:
    rank = down[0] if down else 0
    if len(down) not in (2, 4) or len(up) not in (2, 4) or rank < 1:
        raise Unusable(f"{label}: weights of shape {list(down)} / {list(up)} are no LoRA pair")
    if up[1] != rank or (len(up) == 4 and tuple(up[2:]) != (1, 1)):
        raise Unusable(f"{label}: down {list(down)} and up {list(up)} disagree on the rank")
    kernel = tuple(down[2:]) if len(down) == 4 else (1, 1)
    if layer.kernel is None and kernel != (1, 1):
        raise Unusable(f"{label}: a {kernel[0]}x{kernel[1]} convolution on a linear layer")
    if layer.kernel is not None and kernel != layer.kernel:
        raise Unusable(f"{label}: a {kernel[0]}x{kernel[1]} kernel on a "
                       f"{layer.kernel[0]}x{layer.kernel[1]} convolution")
    if down[1] != layer.in_features or up[0] != layer.out_features:
        raise Unusable(
            f"{label}: made for a layer of {down[1]} -> {up[0]} features; this model's has "
            f"{layer.in_features} -> {layer.out_features} (a LoRA for another model)")
    return None if layer.kernel is None else (kernel[0], kernel[1])


def _alpha(own: float | None, rank: int, config: Any, module: str) -> float:
    """kohya's alpha beside the weights; else diffusers' metadata (`lora_alpha`, its per-module
    `alpha_pattern`, as PEFT resolves it); else alpha = rank (diffusers' default: scale 1)."""
    if own is not None:
        return own
    if config is None:
        return float(rank)
    from peft.utils.other import get_pattern_key

    pattern = config.get("alpha_pattern") or {}
    if pattern:
        key = get_pattern_key(list(pattern), module)
        if key in pattern:
            return float(pattern[key])
    return float(config.get("lora_alpha", rank))


def _metadata(header: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers' adapter metadata, `{"unet.lora_alpha": 8, ...}`, per component."""
    raw = header.get(_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError:
        raise Unusable(f"its {_METADATA_KEY} header is not JSON") from None
    out: dict[str, dict[str, Any]] = {}
    if isinstance(flat, dict):
        for key, value in flat.items():
            component, _, name = str(key).partition(".")
            if component in COMPONENTS and name:
                out.setdefault(component, {})[name] = value
    return out


def load(path: Path, layout: Layout, *, device: torch.device | str,
         dtype: torch.dtype) -> AdapterWeights:
    """Reads the weights `layout` names, alpha / rank folded into the down weights, on
    `device` in `dtype`."""
    from safetensors import safe_open

    weights: AdapterWeights = {}
    with safe_open(str(path), framework="pt") as file:
        for layer in layout.layers:
            down = file.get_tensor(layer.down).to(torch.float32) * layer.scale
            up = file.get_tensor(layer.up).to(torch.float32)
            if layer.kernel is None:
                down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
            else:
                down = down.reshape(down.shape[0], -1, *layer.kernel)
                up = up.reshape(up.shape[0], up.shape[1], 1, 1)
            weights.setdefault(layer.component, {})[layer.module] = Delta(
                down.to(device=device, dtype=dtype).contiguous(),
                up.to(device=device, dtype=dtype).contiguous())
    return weights


def _head(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__
