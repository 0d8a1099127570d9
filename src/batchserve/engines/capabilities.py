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

# Per engine: the image inputs it implements. The diffusers engine (tiny, tiny-inpaint, sd15,
# model folders and files) starts items from an image in its step core (`init_latents`): SD 1.x
# takes both, a standard UNet inpainting by blending the known region back at each step, an
# inpainting UNet (9 input channels) natively; a family without an img2img pipeline will keep
# what it can. `sim` replays a GPU's timing: an image item runs its remaining steps and
# gives back its init image, which is how the transport of inputs is tested end to end.
_SIM = ALL_IMAGE_INPUTS
_DIFFUSERS = ALL_IMAGE_INPUTS


def image_inputs(settings: Settings) -> frozenset[str]:
    """The image inputs (`IMG2IMG`, `INPAINT`) the model of `settings` takes."""
    return _SIM if settings.model == "sim" else _DIFFUSERS
