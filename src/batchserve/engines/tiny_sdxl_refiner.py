"""`--refiner tiny-sdxl-refiner`: a random-weight SDXL refiner built offline in code, for
`tiny-sdxl`.

The shapes of Stability's refiner at toy width: `StableDiffusionXLImg2ImgPipeline` with only the
second (projecting) text encoder, a UNet conditioned on that encoder's states alone and on five
micro-conditioning numbers (original size, crop top-left, aesthetic score:
`requires_aesthetics_score=True`). Like the real refiner in diffusers' ensemble-of-experts
recipe it shares the base's second text encoder and VAE (no second copy in memory).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel

from .tiny import SEED
from .tiny_sdxl import POOLED_DIM, TEXT_DIM_2, TIME_DIM

AESTHETIC_TIME_IDS = 5  # original size (2), crop top-left (2), aesthetic score (1)


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TEXT_DIM_2,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=AESTHETIC_TIME_IDS * TIME_DIM + POOLED_DIM,
        transformer_layers_per_block=1, norm_num_groups=32,
    )


def build_refiner(base: Any) -> Any:
    """The refiner for a loaded `tiny-sdxl` base (its second encoder, tokenizer and VAE); same
    weights on every call (fixed seed), leaving the global RNG as it was."""
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED + 1)
    try:
        model = unet()
    finally:
        torch.random.set_rng_state(state)
    if base.unet.dtype != torch.float32:
        model = model.to(dtype=base.unet.dtype)  # type: ignore[attr-defined]
    pipe: Any = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=model, scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
