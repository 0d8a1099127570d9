"""The engines: the protocol the batcher calls (`protocol`), the diffusers engine (`diffusion`,
with the presets `tiny`, `tiny_inpaint` and `sd15`; `generic` runs any other diffusers
pipeline whole, with the preset `tiny_flux`; items started from an image `init_latents`,
community model files `checkpoints` and prompt encoding
`prompts`: the torch importers), and the simulated GPU (`sim`). Importing this package imports
no torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .protocol import (
    BatchKey,
    Engine,
    EngineInfo,
    GenerationItem,
    LoraPick,
    StepEngine,
    StepRound,
    StepState,
    StopCheck,
    Switch,
    key_label,
    run_round,
    step_engine,
    warm_steps,
)

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = ["BatchKey", "Engine", "EngineInfo", "GenerationItem", "LoraPick", "StepEngine",
           "StepRound", "StepState", "StopCheck", "Switch", "key_label", "load_engine", "run_round",
           "step_engine", "warm_steps"]


def load_engine(settings: Settings) -> Engine:
    """Builds the engine the settings name. Blocking (loads weights); run it off the loop."""
    if settings.model == "sim":
        from .families import check_refiner
        from .sim import SimEngine

        check_refiner(settings, "sim")

        return SimEngine(base_ms=settings.sim_base_ms, per_image_ms=settings.sim_per_image_ms,
                         step_ms=settings.sim_step_ms,
                         step_per_image_ms=settings.sim_step_per_image_ms)
    from .families import resolve

    if resolve(settings.model_family, settings.model, settings.model_config) == "generic":
        from .generic import GenericEngine

        return GenericEngine.load(settings)
    from .diffusion import DiffusionEngine

    return DiffusionEngine.load(settings)
