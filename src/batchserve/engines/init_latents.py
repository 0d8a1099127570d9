"""Items that start from an image (img2img, inpainting) inside the step core: where their
schedule starts, their first latents, what a 9-channel inpainting UNet reads beside them, and the
known region blended back after each step on a standard UNet.

Family-agnostic: it is handed the VAE, the item's scheduler and generator and the tensors of
`engines.inputs`, never a pipeline. Every operation, and the order in which the item's generator
is drawn from, is diffusers' own (`StableDiffusionImg2ImgPipeline.prepare_latents`,
`StableDiffusionInpaintPipeline.prepare_latents` / `prepare_mask_latents` and its denoising
loop), so an item equals what those pipelines make for it alone. Nothing here outlives its item:
the state holds the tensors, the step core drops the state when the item is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from . import inputs
from .protocol import GenerationItem

INPAINTING_CHANNELS = 9
"""`unet.config.in_channels` of an inpainting checkpoint: latents (4), mask (1), masked image
latents (4)."""


def is_inpainting_unet(unet: Any) -> bool:
    return int(unet.config.in_channels) == INPAINTING_CHANNELS


def timesteps_from(scheduler: Any, item: GenerationItem) -> torch.Tensor:
    """The item's timesteps after `set_timesteps`: all of them from noise, or those from its
    start step on (`get_timesteps`: the scheduler's begin index set, so its sigmas and
    `add_noise` count from there)."""
    if item.init is None:
        return scheduler.timesteps  # type: ignore[no-any-return]
    begin = item.start_step * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]  # type: ignore[no-any-return]


def encode(vae: Any, image: torch.Tensor, generator: torch.Generator,
           *, upcast: bool = False) -> torch.Tensor:
    """`image` ([1, 3, H, W] in [-1, 1]) as scaled latents, sampled from the VAE's posterior
    with `generator` (diffusers' `retrieve_latents(..., sample_mode="sample")`). `upcast`: encode
    in float32 (a VAE that overflows in fp16, SDXL's `force_upcast`), returned in `image`'s
    dtype."""
    dtype = vae.dtype
    if upcast and dtype != torch.float32:
        vae.to(dtype=torch.float32)
    try:
        pixels = image.to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator)
    finally:
        if upcast and dtype != torch.float32:
            vae.to(dtype=dtype)
    scaled: torch.Tensor = latents * vae.config.scaling_factor
    return scaled.to(image.dtype)


def _skip_encode(vae: Any, shape: tuple[int, ...], generator: torch.Generator) -> None:
    """Advances `generator` exactly as sampling a VAE posterior of latent `shape` would (the
    inpaint pipeline encodes the masked image on a standard UNet, which never reads it): the
    draw, without the encoder pass."""
    randn_tensor(shape, generator=generator, device=vae.device, dtype=vae.dtype)


@dataclass(eq=False, slots=True)
class InitLatents:
    """What an image item keeps while it steps, beside its latents."""

    mask: torch.Tensor | None = None
    """[1, 1, h, w] on the latent grid, 1 where repainted."""
    image_latents: torch.Tensor | None = None
    """Standard UNet inpainting: the clean init latents the known region is kept from."""
    noise: torch.Tensor | None = None
    """Standard UNet inpainting: the item's noise, re-applied to `image_latents` per step."""
    masked_latents: torch.Tensor | None = None
    """Inpainting UNet: the masked image's latents, its last 4 input channels."""

    def model_input(self, sample: torch.Tensor) -> torch.Tensor:
        """The UNet input of one row from its scaled latents: [latents, mask, masked image
        latents] for an inpainting UNet, the latents alone otherwise."""
        if self.masked_latents is None or self.mask is None:
            return sample
        return torch.cat([sample, self.mask, self.masked_latents], dim=1)

    def after_step(self, latents: torch.Tensor, scheduler: Any, timesteps: torch.Tensor,
                   index: int) -> torch.Tensor:
        """Latents after `scheduler.step` of step `index` (of the item's own `timesteps`): on a
        standard UNet that inpaints, the known region replaced by the init latents noised to
        the next timestep (clean after the last), as the inpaint pipeline does."""
        if self.image_latents is None or self.mask is None or self.noise is None:
            return latents
        proper = self.image_latents
        if index < len(timesteps) - 1:
            # the pipeline's `torch.tensor([timesteps[i + 1]])`, without a device round trip
            proper = scheduler.add_noise(proper, self.noise, timesteps[index + 1 : index + 2])
        return (1 - self.mask) * proper + self.mask * latents


def start(item: GenerationItem, *, vae: Any, scheduler: Any, generator: torch.Generator,
          timesteps: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype,
          device: torch.device, inpainting_unet: bool, vae_scale_factor: int,
          upcast: bool = False) -> tuple[torch.Tensor, InitLatents | None]:
    """An item's first latents (`shape`, 4 latent channels) and what it keeps while it steps
    (None: nothing, a text-to-image item on a standard UNet).

    - text-to-image: noise times `init_noise_sigma`; on an inpainting UNet, as the inpaint
      pipeline with an all-white mask at strength 1 (the masked image is all zero);
    - img2img on a standard UNet: the init image encoded, noised to the first timestep
      (`StableDiffusionImg2ImgPipeline`, strength 1 included);
    - with a mask, or any image on an inpainting UNet (no mask: all white):
      `StableDiffusionInpaintPipeline`.
    """
    init = item.init
    if init is None and not inpainting_unet:
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return noise * scheduler.init_noise_sigma, None
    if init is not None and init.mask is None and not inpainting_unet:
        image = inputs.image_tensor(init).to(device=device, dtype=dtype)
        clean = encode(vae, image, generator, upcast=upcast)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        return scheduler.add_noise(clean, noise, timesteps[:1]), None
    return _start_inpainting(item, vae=vae, scheduler=scheduler, generator=generator,
                             timesteps=timesteps, shape=shape, dtype=dtype, device=device,
                             inpainting_unet=inpainting_unet, vae_scale_factor=vae_scale_factor,
                             upcast=upcast)


def _start_inpainting(item: GenerationItem, *, vae: Any, scheduler: Any,
                      generator: torch.Generator, timesteps: torch.Tensor,
                      shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device,
                      inpainting_unet: bool, vae_scale_factor: int, upcast: bool
                      ) -> tuple[torch.Tensor, InitLatents]:
    init = item.init
    height, width = shape[2] * vae_scale_factor, shape[3] * vae_scale_factor
    if init is None:  # text-to-image on an inpainting UNet: nothing known, nothing to encode
        # zero (grey) in the layout of `inputs.image_tensor`: the VAE reads it as it would
        # read a picture with nothing kept
        image = torch.zeros((1, height, width, 3)).permute(0, 3, 1, 2)
        full = True
        mask = torch.ones((1, 1, shape[2], shape[3]))
        masked = image
    else:
        image = inputs.image_tensor(init)
        full = init.strength >= 1.0  # the pipeline's `is_strength_max`
        small = inputs.latent_mask(init, vae_scale_factor)
        hidden = inputs.masked_image(init)
        mask = torch.ones((1, 1, shape[2], shape[3])) if small is None else small
        masked = image * 0 if hidden is None else hidden  # no mask: all repainted
    image = image.to(device=device, dtype=dtype)
    clean = None
    if not inpainting_unet or not full:
        clean = encode(vae, image, generator, upcast=upcast)
    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if full or clean is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents = scheduler.add_noise(clean, noise, timesteps[:1])
    mask = mask.to(device=device, dtype=dtype)
    if not inpainting_unet:
        _skip_encode(vae, shape, generator)
        return latents, InitLatents(mask=mask, image_latents=clean, noise=noise)
    masked_latents = encode(vae, masked.to(device=device, dtype=dtype), generator, upcast=upcast)
    return latents, InitLatents(mask=mask, masked_latents=masked_latents)
