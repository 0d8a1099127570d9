"""`--model tiny-flux`: a random-weight FLUX.1 built offline in code, like `tiny` for SD 1.x.

FLUX.1's shapes at toy width: a `FluxTransformer2DModel` with the guidance embedding of the
guidance-distilled FLUX.1-dev (the request's `guidance_scale` is a model input, not classifier-
free guidance), a CLIP text encoder for the pooled embedding, a T5 encoder for the token states,
a VAE with 16 latent channels (packed 2x2 into the transformer's 64 input channels, so sizes
are multiples of 16) and the flow-matching Euler scheduler with FLUX's resolution-dependent
shift. Both tokenizers are built without files: `tiny`'s byte-level CLIP one and a
character-level T5 (Unigram) one. Images are noise; the point is that every code path of a real
FLUX checkpoint runs on a CPU in milliseconds.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from .tiny import SEED, build_tokenizer, text_encoder

TEXT_DIM = 32  # the CLIP encoder's width = the pooled projection's
T5_DIM = 32  # the T5 encoder's width = the transformer's joint attention width
LATENT_CHANNELS = 16  # as FLUX's VAE
T5_LENGTH = 512  # the tokenizer's model_max_length, FLUX-dev's max_sequence_length


def build_t5_tokenizer() -> T5Tokenizer:
    """A character-level SentencePiece-style (Unigram) tokenizer: every printable ASCII
    character, alone and word-initial (`▁` + character), after T5's pad, eos and unk."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = ["<pad>", "</s>", "<unk>", "▁"] + chars + ["▁" + c for c in chars]
    vocab = [(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_LENGTH)


def t5_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        pad_token_id=0, eos_token_id=1,
    ))


def transformer() -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
        pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )


def vae() -> AutoencoderKL:
    """4 levels (scale factor 8), 16 latent channels, FLUX's scaling and shift."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
        layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        sample_size=256, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def build_pipeline() -> Any:
    """Same weights on every call (fixed seed), leaving the global RNG as it was."""
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        clip: CLIPTextModel = text_encoder(len(tokenizer))
        t5 = t5_encoder(len(tokenizer_2))
        model, decoder = transformer(), vae()
    finally:
        torch.random.set_rng_state(state)
    parts: list[Any] = [clip, t5, model, decoder]
    for module in parts:
        module.eval()  # built in training mode: T5's dropout would make every image differ
    # FLUX.1-dev's scheduler config: the shift grows with the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe: Any = FluxPipeline(
        scheduler=scheduler, vae=decoder, text_encoder=clip, tokenizer=tokenizer,
        text_encoder_2=t5, tokenizer_2=tokenizer_2, transformer=model,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
