"""`--model tiny-inpaint`: `tiny` with an inpainting UNet (9 input channels: latents, mask,
masked image latents), random weights built offline in code, so the path of SD 1.x inpainting
checkpoints runs and is tested on a CPU. Text-to-image and img2img requests run on it as the
inpaint pipeline runs them with an all-white mask.
"""

from __future__ import annotations

from typing import Any

from . import tiny
from .init_latents import INPAINTING_CHANNELS


def build_pipeline(**scheduler_kwargs: Any) -> Any:
    """Same weights on every call (fixed seed), as `tiny`'s."""
    tokenizer = tiny.build_tokenizer()
    return tiny.assemble(
        tokenizer,
        lambda: (tiny.text_encoder(len(tokenizer)), tiny.unet(INPAINTING_CHANNELS), tiny.vae()),
        **scheduler_kwargs,
    )
