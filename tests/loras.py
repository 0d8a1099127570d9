"""Test support: LoRA files for a model, written in the layouts people download, random weights.

`kohya` writes what kohya's sd-scripts (and so most files on model sites) write:
`lora_unet_<module with _>.lora_down.weight / .lora_up.weight / .alpha`, and for the text
encoder `lora_te_text_model_<module>` (the names CLIP had before transformers flattened it).
It covers attention projections, feed-forward layers, the 1x1 `proj_in`/`proj_out`
convolutions, resnet 3x3 convolutions (LoCon) and time-embedding projections.

`diffusers_format` writes through diffusers' own `save_lora_weights` (PEFT names, `lora_A` /
`lora_B`, alphas in the `lora_adapter_metadata` header).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
               "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2",
               "proj_in", "proj_out", "resnets.0.conv1", "time_emb_proj")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _pairs(model: Any, ends: tuple[str, ...], rank: int, generator: torch.Generator,
           strength: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, module in model.named_modules():
        if not name.endswith(ends):
            continue
        if isinstance(module, torch.nn.Linear):
            down = torch.randn(rank, module.in_features, generator=generator)
            up = torch.randn(module.out_features, rank, generator=generator)
        elif isinstance(module, torch.nn.Conv2d):
            kh, kw = module.kernel_size
            down = torch.randn(rank, module.in_channels, kh, kw, generator=generator)
            up = torch.randn(module.out_channels, rank, 1, 1, generator=generator)
        else:
            continue
        out[name] = (down * strength / down[0].numel() ** 0.5, up * strength)
    return out


def _te_name(name: str) -> str:
    return name if name.startswith("text_model.") else f"text_model.{name}"


def kohya(path: Path, pipe: Any, *, seed: int, rank: int = 4, alpha: float | None = 2.0,
          unet: bool = True, text: bool = True, strength: float = 0.5,
          unet_prefix: str = "lora_unet_") -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    parts = []
    if unet:
        parts.append((unet_prefix, _pairs(pipe.unet, UNET_LAYERS, rank, generator, strength),
                      lambda n: n))
    if text:
        parts.append(("lora_te_", _pairs(pipe.text_encoder, TEXT_LAYERS, rank, generator,
                                         strength), _te_name))
    for prefix, pairs, rename in parts:
        for name, (down, up) in pairs.items():
            key = prefix + rename(name).replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down.contiguous()
            tensors[f"{key}.lora_up.weight"] = up.contiguous()
            if alpha is not None:
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path


def diffusers_format(path: Path, pipe: Any, *, seed: int, rank: int = 4, alpha: float = 8.0,
                     text: bool = True, strength: float = 0.5) -> Path:
    """Through `save_lora_weights`, as diffusers' training scripts save."""
    from diffusers import StableDiffusionPipeline

    generator = torch.Generator().manual_seed(seed)
    unet = {f"{name}.{ab}.weight": t
            for name, (down, up) in _pairs(pipe.unet, UNET_LAYERS, rank, generator,
                                           strength).items()
            for ab, t in (("lora_A", down), ("lora_B", up))}
    te = {f"{name}.{ab}.weight": t
          for name, (down, up) in _pairs(pipe.text_encoder, TEXT_LAYERS, rank, generator,
                                         strength).items()
          for ab, t in (("lora_A", down), ("lora_B", up))} if text else None
    meta = {"r": rank, "lora_alpha": alpha,
            "target_modules": sorted({k.split(".lora_")[0] for k in unet})}
    te_meta = ({"r": rank, "lora_alpha": alpha,
                "target_modules": sorted({k.split(".lora_")[0] for k in te})} if te else None)
    StableDiffusionPipeline.save_lora_weights(
        str(path.parent), unet_lora_layers=unet, text_encoder_lora_layers=te,
        unet_lora_adapter_metadata=meta, text_encoder_lora_adapter_metadata=te_meta,
        weight_name=path.name, safe_serialization=True,
    )
    return path
