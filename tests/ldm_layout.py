"""Test support: writes a diffusers SD 1.x pipeline in the ORIGINAL single-file layout.

Community checkpoints are one file whose keys follow the CompVis/LDM code
(`model.diffusion_model.input_blocks.1.1...`, `first_stage_model.decoder.up.3.block.0...`,
`cond_stage_model.transformer.text_model...`). diffusers ships only the other direction for any
shape (`diffusers.loaders.single_file_utils.convert_ldm_*`, used by `from_single_file`); its
`scripts/convert_diffusers_to_original_stable_diffusion.py` hard-codes SD 1.5's four levels of two
layers, so it cannot write the tiny model. This is the inverse of `single_file_utils` for any
level count and `layers_per_block`; `test_checkpoints` round-trips it through the library's own
forward conversion, so a mistake here fails a test instead of hiding.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                ("conv_shortcut", "skip_connection")]
_VAE_ATTENTION = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out.")]


def _rename(rest: str, pairs: list[tuple[str, str]]) -> str:
    for new, old in pairs:
        rest = rest.replace(new, old)
    return rest


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    per_down = config["layers_per_block"] + 1  # LDM counts the downsampler as one more layer
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]  # diffusers name -> LDM name
    if key in top:
        return str(top[key])
    added = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]  # SDXL's text_time
    if key in added:
        return str(added[key])
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{1 + b * per_down + j}.0.{_rename(rest, _UNET_RESNET)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * per_down + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_down}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        b, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{b * per_down + j}.0.{_rename(rest, _UNET_RESNET)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
        return f"output_blocks.{int(m[1]) * per_down + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m[1])
        # The upsampler follows the block's last layer: after its attention when it has one.
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
        return f"output_blocks.{b * per_down + per_down - 1}.{slot}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def vae_key(key: str, config: Mapping[str, Any]) -> str:
    levels = len(config["up_block_types"])
    top = DIFFUSERS_TO_LDM_MAPPING["vae"]  # diffusers name -> LDM name
    if key in top:
        return str(top[key])
    resnet = [("conv_shortcut", "nin_shortcut")]
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename(m[3], resnet)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        # LDM numbers the decoder's levels from the bottom, diffusers from the top.
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{_rename(m[3], resnet)}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename(m[3], resnet)}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTENTION)}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def vae_state_dict(vae: Any) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in vae.state_dict().items():
        name = vae_key(key, vae.config)
        if ".mid.attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[name] = tensor
    return out


def pipeline_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    unet = {UNET_PREFIX + unet_key(k, pipe.unet.config): v
            for k, v in pipe.unet.state_dict().items()}
    vae = {VAE_PREFIX + k: v for k, v in vae_state_dict(pipe.vae).items()}
    # Original files name the text model as transformers < 5.6 did (`text_model.` included).
    clip = {CLIP_PREFIX + "text_model." + k.removeprefix("text_model."): v
            for k, v in pipe.text_encoder.state_dict().items()}
    return {**unet, **vae, **clip}


SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPENCLIP_PREFIX = "conditioner.embedders.0.model."
_OPENCLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]


def openclip_state_dict(encoder: Any) -> dict[str, torch.Tensor]:
    """A `CLIPTextModelWithProjection` as OpenCLIP names it (SDXL's second encoder): fused
    q/k/v projections, `resblocks`, a transposed `text_projection`; the inverse of diffusers'
    `convert_open_clip_checkpoint`."""
    state = {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"),
           "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}
    state.pop("embeddings.position_ids", None)
    layers = {int(m[1]) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    for i in sorted(layers):
        ours = f"encoder.layers.{i}."
        theirs = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key in [k for k in state if k.startswith(ours)]:
            out[theirs + _rename(key.removeprefix(ours), _OPENCLIP_LAYER)] = state.pop(key)
    if state:
        raise KeyError(f"no OpenCLIP name for {sorted(state)[:3]}")
    return out


def sdxl_state_dict(pipe: Any) -> dict[str, torch.Tensor]:
    """An SDXL pipeline in the original layout (Stability's `sd_xl_base_1.0.safetensors`), or
    the refiner's (`sd_xl_refiner_1.0.safetensors`: no CLIP ViT-L, so OpenCLIP bigG is its
    embedder 0)."""
    unet = {UNET_PREFIX + unet_key(k, pipe.unet.config): v
            for k, v in pipe.unet.state_dict().items()}
    vae = {VAE_PREFIX + k: v for k, v in vae_state_dict(pipe.vae).items()}
    first = getattr(pipe, "text_encoder", None)
    clip = {} if first is None else {
        SDXL_CLIP_PREFIX + "text_model." + k.removeprefix("text_model."): v
        for k, v in first.state_dict().items()}
    prefix = SDXL_OPENCLIP_PREFIX if first is not None else SDXL_REFINER_OPENCLIP_PREFIX
    big = {prefix + k: v for k, v in openclip_state_dict(pipe.text_encoder_2).items()}
    return {**unet, **vae, **clip, **big}


def save_single_file(pipe: Any, path: Path) -> Path:
    """The pipeline's weights as one original-layout `.safetensors` file."""
    state = (sdxl_state_dict(pipe) if getattr(pipe, "text_encoder_2", None) is not None
             else pipeline_state_dict(pipe))
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(path))
    return path
