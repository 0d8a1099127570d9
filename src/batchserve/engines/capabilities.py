"""What the served model can take besides a prompt, known from the settings alone (a `--role
api` process loads no model, yet validates every request): the hook the doors ask before
queueing an image request, so one the engine cannot honour is a clear 422, never an image that
silently ignored its input. No torch here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

IMG2IMG = "img2img"
"""Starts from an init image (`init_image`, `strength`)."""
INPAINT = "inpaint"
"""Repaints the masked region of an init image (`mask_image`, `mask_blur`)."""
ALL_IMAGE_INPUTS = frozenset({IMG2IMG, INPAINT})

# Per engine and family: the image inputs it implements. The diffusers engine starts items
# from an image in its step core (`init_latents`) for the families whose step core is written
# for it: SD 1.x and SDXL take both, a standard UNet inpainting by blending the known region
# back at each step, an inpainting UNet (9 input channels) natively. The `generic` family runs
# whole pipelines: img2img where diffusers has an img2img sibling of the pipeline that keeps the
# per-item seed guarantee (`families.generic.IMG2IMG`: FLUX.1, SD3, Qwen-Image), no inpainting;
# any other generic pipeline takes none. Refused inputs are a 422 at validation, in the door's
# shape, rather than served from noise. `sim` replays a
# GPU's timing: an image item runs its remaining steps and gives back its init image, which is
# how the transport of inputs is tested end to end.
_SIM = ALL_IMAGE_INPUTS
_FAMILIES: dict[str, frozenset[str]] = {"sd1": ALL_IMAGE_INPUTS, "sdxl": ALL_IMAGE_INPUTS}


def image_inputs(settings: Settings) -> frozenset[str]:
    """The image inputs (`IMG2IMG`, `INPAINT`) the model of `settings` takes, from its family as
    read from disk without loading it (`families.detect`; sd1 when nothing tells, as the engine
    assumes then)."""
    if settings.model == "sim":
        return _SIM
    from .families.detect import detect

    family = settings.model_family
    if family == "auto":
        family = detect(settings.model, settings.model_config) or "sd1"
    if family == "generic":
        from .families.generic import IMG2IMG as WHOLE_IMG2IMG
        from .families.generic import pipeline_on_disk

        return frozenset({IMG2IMG}) if pipeline_on_disk(settings.model) in WHOLE_IMG2IMG \
            else frozenset()
    return _FAMILIES.get(family, frozenset())
