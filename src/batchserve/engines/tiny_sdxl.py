"""`--model tiny-sdxl`: a random-weight SDXL built offline in code, like `tiny` for SD 1.x.

SDXL's shapes at toy width: two text encoders (a CLIP `CLIPTextModel` and a projecting
`CLIPTextModelWithProjection`, whose hidden states are concatenated and whose pooled output
conditions the UNet), a UNet with `addition_embed_type="text_time"` (pooled text + the six
micro-conditioning numbers), the VAE of `tiny` (scale factor 8). Images are noise.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tiny import SEED, build_tokenizer

TEXT_DIM = 32  # the first encoder's width
TEXT_DIM_2 = 48  # the second's: other than the first, as in SDXL (768, 1280), which is how
# diffusers' single-file loader tells the two apart
POOLED_DIM = 32  # the second encoder's projection
TIME_DIM = 8  # per micro-conditioning number


def _text_config(vocab_size: int, hidden_size: int, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **extra,
    )


def unet(in_channels: int = 4) -> UNet2DConditionModel:
    """`in_channels` 9: an inpainting UNet (latents, mask, masked image latents)."""
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM + TEXT_DIM_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM,
        transformer_layers_per_block=1,
        norm_num_groups=32,
    )


def vae() -> AutoencoderKL:
    """`tiny`'s VAE shape (4 levels: scale factor 8, 4 latent channels)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=1024,
    )


def build_pipeline(**scheduler_kwargs: Any) -> Any:
    """Same weights on every call (fixed seed), leaving the global RNG as it was."""
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        text_encoder = CLIPTextModel(_text_config(len(tokenizer), TEXT_DIM))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(len(tokenizer_2), TEXT_DIM_2, projection_dim=POOLED_DIM)
        )
        model, decoder = unet(), vae()
    finally:
        torch.random.set_rng_state(state)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, **scheduler_kwargs,
    )
    pipe: Any = StableDiffusionXLPipeline(
        vae=decoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=model, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
