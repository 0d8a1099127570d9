"""An item's image inputs (`ImageInput`) as the tensors diffusers' img2img and inpaint pipelines
prepare from the same images, for the engine that starts items from them.

Each function equals diffusers' own preprocessing of the fitted image (tests compare them):
`VaeImageProcessor.preprocess` for the image, the inpaint pipeline's `mask_processor`
(greyscale, not normalised, binarised at 0.5) for the mask, the masked image it gives a 9-channel
UNet, and `prepare_mask_latents`' resize of the mask to the latent grid. All are float32 on the
CPU, one row each (N = 1): the engine moves, casts and stacks them per batch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .protocol import ImageInput


def _plane(data: bytes, height: int, width: int, channels: int) -> torch.Tensor:
    """uint8 pixels (rows top to bottom) as a [1, C, H, W] float32 tensor in [0, 1]."""
    array = np.frombuffer(data, dtype=np.uint8).reshape(1, height, width, channels)
    pixels = torch.from_numpy(array.copy())  # bytes are read-only; torch wants to own it
    # NHWC memory viewed as NCHW, the layout (strides) of diffusers' own preprocessing: the
    # VAE's kernels pick their path by layout, and an all-grey image (a masked image with
    # nothing kept) is ill-conditioned enough under GroupNorm for the paths to differ visibly.
    return pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0


def image_tensor(init: ImageInput) -> torch.Tensor:
    """The init image as [1, 3, H, W] in [-1, 1]: what the VAE encodes."""
    return _plane(init.rgb, init.height, init.width, 3) * 2.0 - 1.0


def mask_tensor(init: ImageInput) -> torch.Tensor | None:
    """The mask as [1, 1, H, W] of 0.0 (keep) and 1.0 (repaint), binarised at 0.5 as the
    inpaint pipeline's mask processor does; None without a mask."""
    if init.mask is None:
        return None
    mask = _plane(init.mask, init.height, init.width, 1)
    return (mask >= 0.5).to(torch.float32)


def masked_image(init: ImageInput) -> torch.Tensor | None:
    """The init image with the region to repaint zeroed (`image * (mask < 0.5)`): what a
    9-channel inpainting UNet gets, VAE-encoded, beside the latents; None without a mask."""
    mask = mask_tensor(init)
    if mask is None:
        return None
    return image_tensor(init) * (mask < 0.5)


def latent_mask(init: ImageInput, vae_scale_factor: int) -> torch.Tensor | None:
    """The mask on the latent grid, [1, 1, H / f, W / f] (nearest, as `prepare_mask_latents`):
    the region a 4-channel UNet's latents keep from the noised init latents at every step, and
    the mask channel of a 9-channel UNet; None without a mask."""
    mask = mask_tensor(init)
    if mask is None:
        return None
    size = (init.height // vae_scale_factor, init.width // vae_scale_factor)
    return F.interpolate(mask, size=size)
