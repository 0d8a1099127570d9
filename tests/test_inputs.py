"""`engines.inputs` and the start step: an item's image inputs become exactly the tensors
diffusers' own img2img / inpaint pipelines prepare from the same images, and an item starts at
the step diffusers' `get_timesteps` starts it at."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline
from diffusers.image_processor import VaeImageProcessor

from batchserve import images
from batchserve.engines import GenerationItem
from batchserve.engines.inputs import image_tensor, latent_mask, mask_tensor, masked_image
from batchserve.engines.protocol import ImageInput
from batchserve.images import MaskRule

from imagedata import encode, gradient, mask

VAE_SCALE = 8


def fitted(width: int, height: int, *, with_mask: bool = True) -> tuple[ImageInput, object]:
    """An input fitted from a 100x60 picture (so it is resized), and the PIL images diffusers
    would be handed: the original picture and mask, which its processors resize themselves."""
    picture, painted = gradient(100, 60), mask(100, 60, (13, 9, 61, 41))
    decoded = images.decode(encode(picture), encode(painted) if with_mask else None,
                            max_pixels=10**6, rule=MaskRule.WHITE, init_label="init_image",
                            mask_label="mask_image")
    # mask_blur 0: diffusers leaves blurring to the caller (`mask_processor.blur`)
    return images.fit(decoded, width, height, strength=0.6, mask_blur=0), (picture, painted)


def test_image_tensor_equals_diffusers_preprocessing() -> None:
    init, (picture, _) = fitted(64, 48)
    theirs = VaeImageProcessor(vae_scale_factor=VAE_SCALE).preprocess(picture, 48, 64)
    ours = image_tensor(init)
    assert ours.shape == (1, 3, 48, 64) and ours.dtype == torch.float32
    assert torch.equal(ours, theirs)
    assert ours.min() >= -1 and ours.max() <= 1


def test_mask_tensors_equal_the_inpaint_pipelines() -> None:
    init, (picture, painted) = fitted(64, 48)
    processor = VaeImageProcessor(vae_scale_factor=VAE_SCALE, do_normalize=False,
                                  do_binarize=True, do_convert_grayscale=True)
    condition = processor.preprocess(painted, 48, 64)  # the pipeline's `mask_condition`
    ours = mask_tensor(init)
    assert ours is not None and ours.shape == (1, 1, 48, 64)
    assert torch.equal(ours, condition)
    assert set(ours.unique().tolist()) == {0.0, 1.0}
    image = VaeImageProcessor(vae_scale_factor=VAE_SCALE).preprocess(picture, 48, 64)
    hidden = masked_image(init)
    assert hidden is not None and torch.equal(hidden, image * (condition < 0.5))
    small = latent_mask(init, VAE_SCALE)
    expected = torch.nn.functional.interpolate(condition, size=(48 // 8, 64 // 8))
    assert small is not None and small.shape == (1, 1, 6, 8) and torch.equal(small, expected)


def test_without_a_mask_the_mask_tensors_are_none() -> None:
    init, _ = fitted(64, 48, with_mask=False)
    assert mask_tensor(init) is None and masked_image(init) is None
    assert latent_mask(init, VAE_SCALE) is None


@pytest.mark.parametrize("steps", [1, 2, 7, 10, 20, 25, 30, 50, 100])
@pytest.mark.parametrize("strength", [0.05, 0.1, 0.29, 0.3, 0.33, 0.5, 0.7, 0.75, 0.9, 1.0])
def test_start_step_is_where_diffusers_starts(steps: int, strength: float) -> None:
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(steps)
    pipe = SimpleNamespace(scheduler=scheduler)
    timesteps, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(
        pipe, steps, strength, "cpu")
    init = ImageInput(8, 8, bytes(8 * 8 * 3), strength)
    item = GenerationItem("p", "", 1, 8, 8, steps, 7.5, "", init)
    assert item.start_step == steps - remaining
    assert torch.equal(timesteps, scheduler.timesteps[item.start_step:])
    base = (8, 8, steps, 7.5, "")
    assert item.key == (base if item.start_step == 0 else (*base, item.start_step))
