"""The sampler names every engine serves. Torch-free, so the validator, the settings and the
doors share one list; `engines.diffusion` maps each name onto its diffusers scheduler."""

from __future__ import annotations

SAMPLERS: tuple[str, ...] = (
    "dpm++2m-karras", "dpm++2m", "unipc", "euler", "euler-a", "ddim", "heun",
)
DEFAULT_SAMPLER = "dpm++2m-karras"
