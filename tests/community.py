"""Test support: community model files for the tiny model, in the formats users download.

Each writer makes a file the way the tools people use make it: an original-layout single-file
checkpoint (`ldm_layout`), A1111 textual-inversion embeddings (`.pt` with `string_to_param`,
`.safetensors` with `emb_params`) and the diffusers `{token: vector}` kind, a kohya-style LoRA
(`lora_unet_<module>.lora_down/lora_up/alpha`), and VAEs as a folder or one original-layout file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ldm_layout import VAE_PREFIX, vae_state_dict
from PIL.Image import Image
from safetensors.torch import save_file

TEXT_DIM = 32  # the tiny model's CLIP width


def vectors(n: int, seed: int, dim: int = TEXT_DIM) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator)


def a1111_pt(path: Path, emb: torch.Tensor) -> Path:
    torch.save({"string_to_param": {"*": emb}, "name": path.stem, "step": 1000,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    return path


def a1111_safetensors(path: Path, emb: torch.Tensor) -> Path:
    save_file({"emb_params": emb.contiguous()}, str(path))
    return path


def diffusers_embedding(path: Path, emb: torch.Tensor) -> Path:
    save_file({"<learned>": emb.contiguous()}, str(path))
    return path


def kohya_lora(path: Path, unet: Any, *, seed: int, rank: int = 4, in_dim: int | None = None,
               key_prefix: str = "lora_unet_") -> Path:
    """LoRA on every attention projection of the UNet, named as kohya's sd-scripts name them.
    `in_dim` forces a width (a LoRA made for another model)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")):
            continue
        key = key_prefix + name.replace(".", "_")
        width = in_dim or module.in_features
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, width, generator=generator) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank,
                                                       generator=generator) * 0.3
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return path


def other_vae(like: Any, seed: int, **config: Any) -> Any:
    """A VAE of the same architecture (unless `config` changes it) with other weights."""
    from diffusers import AutoencoderKL

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return AutoencoderKL.from_config({**like.config, **config})
    finally:
        torch.random.set_rng_state(state)


def vae_single_file(vae: Any, path: Path, prefix: str = VAE_PREFIX) -> Path:
    """Original layout: as cut from a full checkpoint (`first_stage_model.`) or as the
    stand-alone VAE files are published (no prefix)."""
    tensors = {prefix + k: v.detach().contiguous().clone()
               for k, v in vae_state_dict(vae).items()}
    save_file(tensors, str(path))
    return path


def pixels(image: Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def same(a: Image, b: Image) -> bool:
    """Equal after uint8 rounding, +-1 tolerated on CPU float32 (the spec's rule)."""
    return bool(np.abs(pixels(a) - pixels(b)).max() <= 1)
