"""The sampler names every engine serves. Torch-free, so the validator, the settings and the
doors share one list; `engines.diffusion` maps each name onto its diffusers scheduler.

Which of them a model can use depends on its scheduler's kind (`engines.families.generic`):
SD 1.x, SDXL and other noise-prediction models take the classic `SAMPLERS`; flow-matching
models (FLUX.1, SD3) take `FLOW_SAMPLERS`; a pipeline whose own scheduler is neither (e.g.
Sana's flow-sigma DPM-Solver) takes only `NATIVE`, its scheduler as shipped."""

from __future__ import annotations

SAMPLERS: tuple[str, ...] = (
    "dpm++2m-karras", "dpm++2m", "unipc", "euler", "euler-a", "ddim", "heun",
)
DEFAULT_SAMPLER = "dpm++2m-karras"
FLOW_SAMPLERS: tuple[str, ...] = ("flow-euler",)
"""Flow matching: FlowMatchEulerDiscreteScheduler from the checkpoint's own config (its shift,
dynamic shifting)."""
NATIVE = "native"
"""The checkpoint's own scheduler, untouched."""
ALL_SAMPLERS: tuple[str, ...] = (*SAMPLERS, *FLOW_SAMPLERS, NATIVE)
"""Every name any model may serve (`--scheduler`'s choices)."""
