"""SDXL items that start from an image (`tiny-sdxl`): each equals diffusers' own
`StableDiffusionXLImg2ImgPipeline` / `StableDiffusionXLInpaintPipeline` for the same seed (uint8
+-1), alone, in a whole batch with text-to-image strangers, and joined part-way into a running
batch at its start step; a 9-channel (inpainting) SDXL UNet runs as such."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
from PIL import Image
from test_stepwise import pixels, run_until_done

from batchserve.engines import GenerationItem, tiny_sdxl
from batchserve.engines.diffusion import DiffusionEngine, make_scheduler
from batchserve.engines.init_latents import INPAINTING_CHANNELS
from batchserve.engines.protocol import ImageInput
from batchserve.settings import Settings

from imagedata import gradient, mask

SIZE = 64


def item(seed: int, strength: float | None, *, masked: bool = False, steps: int = 6,
         sampler: str = "dpm++2m-karras", guidance: float = 6.0) -> GenerationItem:
    init = None
    if strength is not None:
        painted = mask(SIZE, SIZE, (8, 16, 40, 56)) if masked else None
        init = ImageInput(SIZE, SIZE, gradient(SIZE, SIZE).tobytes(), strength,
                          None if painted is None else painted.tobytes())
    return GenerationItem(f"a harbour at dusk, take {seed}", "fog", seed, SIZE, SIZE, steps,
                          guidance, sampler, init)


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny-sdxl", warmup=""))


def diffusers_image(engine: DiffusionEngine, it: GenerationItem) -> np.ndarray:
    """What diffusers' own SDXL img2img (no mask) or inpaint pipeline makes for `it`."""
    init = it.init
    assert init is not None
    picture = Image.frombytes("RGB", (init.width, init.height), init.rgb)
    common: dict[str, Any] = dict(
        prompt=it.prompt, negative_prompt=it.negative_prompt, image=picture,
        strength=init.strength, num_inference_steps=it.inference_steps,
        guidance_scale=it.guidance_scale, generator=torch.Generator().manual_seed(it.seed),
    )
    components = engine.pipe.components
    if init.mask is None:
        pipe: Any = StableDiffusionXLImg2ImgPipeline(**components)
    else:
        pipe = StableDiffusionXLInpaintPipeline(**components)
        common.update(mask_image=Image.frombytes("L", picture.size, init.mask),
                      height=init.height, width=init.width)
    pipe.scheduler = make_scheduler(it.sampler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pixels(pipe(**common).images[0])


def alone(engine: DiffusionEngine, it: GenerationItem) -> np.ndarray:
    return pixels(engine.generate([it])[0])


def close(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


# strength 1 (from noise, the image seeding it), a middle one, and one that runs 1 of 6 steps
@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpaint"])
@pytest.mark.parametrize("sampler", ["dpm++2m-karras", "euler-a"])
def test_equals_diffusers_sdxl_pipelines(engine: DiffusionEngine, strength: float,
                                         masked: bool, sampler: str) -> None:
    it = item(3, strength, masked=masked, sampler=sampler)
    ours = alone(engine, it)
    assert close(ours, diffusers_image(engine, it)) <= 1
    if strength < 1 and it.init is not None:  # the image matters: another one, another result
        other = replace(it, init=replace(it.init, rgb=bytes(SIZE * SIZE * 3)))
        assert close(alone(engine, other), ours) > 3  # well past the +-1 bound


def test_in_a_batch_with_text_to_image_strangers_and_joined_part_way(
        engine: DiffusionEngine) -> None:
    text = item(10, None, steps=8)
    img2img, inpaint = item(11, 0.5, steps=8), item(12, 0.75, masked=True, steps=8)
    expected = {it: alone(engine, it) for it in (text, img2img, inpaint)}
    # whole batch: same start step (strength 1 starts at step 0 with text-to-image)
    batch = [item(20, None), item(21, 1.0), item(22, 1.0, masked=True)]
    for it, image in zip(batch, engine.generate(batch), strict=True):
        assert close(pixels(image), alone(engine, it)) <= 1, it
    joined = run_until_done(engine, engine.prepare([text]), [img2img, inpaint], join_after=2)
    assert joined.keys() == expected.keys()
    for it, image in joined.items():
        assert close(image, expected[it]) <= 1, it


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory: pytest.TempPathFactory) -> DiffusionEngine:
    """`tiny-sdxl` with a 9-channel (inpainting) UNet, saved as a diffusers folder: the path of
    an SDXL inpainting checkpoint, detected from its UNet's input channels."""
    pipe = tiny_sdxl.build_pipeline()
    state = torch.random.get_rng_state()
    torch.manual_seed(tiny_sdxl.SEED)
    try:
        pipe.register_modules(unet=tiny_sdxl.unet(INPAINTING_CHANNELS))
    finally:
        torch.random.set_rng_state(state)
    folder = tmp_path_factory.mktemp("tiny-sdxl-inpaint")
    pipe.save_pretrained(folder)
    return DiffusionEngine.load(Settings(model=str(folder), warmup=""))


@pytest.mark.parametrize("strength,masked", [(1.0, True), (0.5, True), (0.5, False)])
def test_an_sdxl_inpainting_unet_equals_diffusers_inpaint_pipeline(
        inpainting: DiffusionEngine, strength: float, masked: bool) -> None:
    assert inpainting.pipe.unet.config.in_channels == INPAINTING_CHANNELS
    it = item(5, strength, masked=masked)
    if not masked:  # the inpaint pipeline's way: an all-white mask
        assert it.init is not None
        as_inpaint = replace(it, init=replace(it.init, mask=b"\xff" * SIZE * SIZE))
    assert close(alone(inpainting, it),
                 diffusers_image(inpainting, it if masked else as_inpaint)) <= 1


def test_an_sdxl_inpainting_unet_batches_text_and_image_items(
        inpainting: DiffusionEngine) -> None:
    batch = [item(30, None), item(31, 1.0, masked=True), item(32, 1.0)]
    for it, image in zip(batch, inpainting.generate(batch), strict=True):
        assert close(pixels(image), alone(inpainting, it)) <= 1, it
    joined = run_until_done(inpainting, inpainting.prepare([item(33, None, steps=6)]),
                            [item(34, 0.5, masked=True, steps=6)], join_after=3)
    for it, image in joined.items():
        assert close(image, alone(inpainting, it)) <= 1, it
