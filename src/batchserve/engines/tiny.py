"""`--model tiny`: a random-weight Stable Diffusion built offline in code.

SD 1.x shapes at toy width: 4 VAE levels (scale factor 8, 4 latent channels), a cross-attention
UNet, a CLIP text encoder and a 77-token byte-level CLIP tokenizer made without files. The images
are noise; the point is that every code path of a real checkpoint runs on a CPU in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SEED = 0
TEXT_DIM = 32


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """The 256 byte symbols of CLIP's BPE (plain and word-final) plus the two special tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    symbols = []
    for b in range(256):
        if b in printable:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, []


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = _byte_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


def unet(in_channels: int = 4) -> UNet2DConditionModel:
    """The tiny UNet; `in_channels` 9 makes it an inpainting UNet (latents, mask, masked image
    latents), as SD 1.x inpainting checkpoints are."""
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=512,
    )


def build_pipeline(**scheduler_kwargs: Any) -> Any:
    """Same weights on every call (fixed seed), so images are reproducible across restarts."""
    tokenizer = build_tokenizer()
    return assemble(
        tokenizer, lambda: (text_encoder(len(tokenizer)), unet(), vae()), **scheduler_kwargs
    )


def assemble(
    tokenizer: CLIPTokenizer,
    build_models: Callable[[], tuple[Any, Any, Any]],
    **scheduler_kwargs: Any,
) -> Any:
    """A pipeline from `build_models()` (text encoder, UNet, VAE) initialised under a fixed seed,
    leaving the global RNG as it was, with SD 1.x's noise schedule."""
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        text_encoder, unet, vae = build_models()
    finally:
        torch.random.set_rng_state(state)
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        **scheduler_kwargs,
    )
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
