"""`--model sd15`: the full Stable Diffusion 1.5 architecture with random weights, built offline.

It has the real model's shapes and cost (UNet ~860M parameters, VAE ~84M, CLIP ViT-L text encoder
~123M) so GPU throughput and memory can be measured without downloading a checkpoint. Images are
noise. The tokenizer is the byte-level one of `tiny`: the cost of a forward pass does not depend
on which token ids are fed.
"""

from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from .tiny import assemble, build_tokenizer

CLIP_VOCAB = 49408  # ViT-L/14's embedding table; the byte tokenizer uses its first 514 rows

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}


def text_config(bos_token_id: int, eos_token_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
        vocab_size=CLIP_VOCAB,
        max_position_embeddings=77,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def build_pipeline(**scheduler_kwargs: Any) -> Any:
    """Same weights on every call (fixed seed). Takes tens of seconds and ~4 GiB in fp32."""
    tokenizer = build_tokenizer()

    def models() -> tuple[Any, Any, Any]:
        text = CLIPTextModel(text_config(tokenizer.bos_token_id, tokenizer.eos_token_id))
        return text, UNet2DConditionModel(**UNET_CONFIG), AutoencoderKL(**VAE_CONFIG)

    return assemble(tokenizer, models, **scheduler_kwargs)
