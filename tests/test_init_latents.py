"""Items that start from an image in the diffusers engine: each equals diffusers' own
`StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline` for the same seed (uint8
+-1), alone, in a whole batch with text-to-image items, and joined part-way into a running
batch at its start step; an inpainting UNet (`tiny-inpaint`, 9 input channels) runs as such."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from inprocess import in_process
from PIL import Image
from test_stepwise import pixels, run_until_done

from batchserve import images
from batchserve.engines import GenerationItem
from batchserve.engines.capabilities import IMG2IMG, INPAINT, image_inputs
from batchserve.engines.diffusion import DiffusionEngine, make_scheduler
from batchserve.engines.protocol import ImageInput
from batchserve.settings import Settings

from imagedata import b64, encode, gradient, mask

SIZE = 64


def image_input(strength: float, *, masked: bool = False) -> ImageInput:
    picture = gradient(SIZE, SIZE)
    painted = mask(SIZE, SIZE, (8, 16, 40, 56)) if masked else None
    return ImageInput(SIZE, SIZE, picture.tobytes(), strength,
                      None if painted is None else painted.tobytes())


def item(seed: int, strength: float | None, *, masked: bool = False, steps: int = 10,
         sampler: str = "dpm++2m-karras", guidance: float = 7.5) -> GenerationItem:
    init = None if strength is None else image_input(strength, masked=masked)
    return GenerationItem(f"a lighthouse, take {seed}", "fog", seed, SIZE, SIZE, steps,
                          guidance, sampler, init)


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup=""))


@pytest.fixture(scope="module")
def inpainting() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny-inpaint", warmup=""))


def diffusers_image(engine: DiffusionEngine, it: GenerationItem) -> np.ndarray:
    """What diffusers' own pipeline makes for `it`: img2img without a mask on a standard UNet,
    else inpainting (an inpainting UNet without a mask: an all-white one)."""
    init = it.init
    assert init is not None
    components = {**engine.pipe.components, "requires_safety_checker": False}
    picture = Image.frombytes("RGB", (init.width, init.height), init.rgb)
    common: dict[str, Any] = dict(
        prompt=it.prompt, negative_prompt=it.negative_prompt, image=picture,
        strength=init.strength, num_inference_steps=it.inference_steps,
        guidance_scale=it.guidance_scale, generator=torch.Generator().manual_seed(it.seed),
    )
    if init.mask is None and not engine._steps.inpainting_unet:
        pipe: Any = StableDiffusionImg2ImgPipeline(**components)
    else:
        pipe = StableDiffusionInpaintPipeline(**components)
        common["mask_image"] = (Image.new("L", picture.size, 255) if init.mask is None
                                else Image.frombytes("L", picture.size, init.mask))
        common.update(height=init.height, width=init.width)
    # set as the engine sets it: after construction, which would rewrite an old config's
    # `clip_sample` (DDIM) for the pipeline alone
    pipe.scheduler = make_scheduler(it.sampler, engine.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pixels(pipe(**common).images[0])


def alone(engine: DiffusionEngine, it: GenerationItem) -> np.ndarray:
    return pixels(engine.generate([it])[0])


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.abs(a - b).max() <= 1)


def test_an_inpainting_checkpoint_folder_is_served_as_the_preset(
        inpainting: DiffusionEngine, tmp_path: Path) -> None:
    """An inpainting checkpoint as published (a folder saved from
    StableDiffusionInpaintPipeline) is SD 1.x with its 9-channel UNet, images in offered: the
    same images as the preset's, not a generic pipeline."""
    folder = tmp_path / "inpainting"
    StableDiffusionInpaintPipeline(**{**inpainting.pipe.components,
                                      "requires_safety_checker": False}).save_pretrained(folder)
    settings = Settings(model=str(folder), warmup="")
    assert image_inputs(settings) == {IMG2IMG, INPAINT}
    served = DiffusionEngine.load(settings)
    assert served._steps.inpainting_unet
    for it in (item(5, 0.6, masked=True), item(6, None)):
        assert close(alone(served, it), alone(inpainting, it))


# strength 1 (from noise, the image seeding it), a middle one, and one that runs 2 of 10 steps
@pytest.mark.parametrize("strength", [1.0, 0.6, 0.25])
@pytest.mark.parametrize("sampler", ["dpm++2m-karras", "euler-a", "ddim", "heun"])
def test_img2img_equals_diffusers_img2img_pipeline(engine: DiffusionEngine, strength: float,
                                                   sampler: str) -> None:
    it = item(3, strength, sampler=sampler)
    ours = alone(engine, it)
    assert close(ours, diffusers_image(engine, it))
    if strength < 1:  # the image matters: another picture, another result at the same seed
        other = replace(it, init=replace(image_input(strength), rgb=bytes(SIZE * SIZE * 3)))
        assert np.abs(alone(engine, other) - ours).max() > 3  # well past the +-1 bound


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("sampler", ["dpm++2m-karras", "euler-a"])
def test_inpainting_on_a_standard_unet_equals_diffusers_inpaint_pipeline(
        engine: DiffusionEngine, strength: float, sampler: str) -> None:
    it = item(4, strength, masked=True, sampler=sampler)
    ours = alone(engine, it)
    assert close(ours, diffusers_image(engine, it))
    # the region outside the (latent) mask is the init image's, through the VAE; inside, not
    assert ours.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("strength,masked", [(1.0, True), (0.5, True), (0.5, False)])
def test_an_inpainting_unet_equals_diffusers_inpaint_pipeline(
        inpainting: DiffusionEngine, strength: float, masked: bool) -> None:
    assert inpainting.pipe.unet.config.in_channels == 9
    it = item(5, strength, masked=masked)
    assert close(alone(inpainting, it), diffusers_image(inpainting, it))


def test_text_to_image_on_an_inpainting_unet_is_an_all_white_inpaint(
        inpainting: DiffusionEngine) -> None:
    text = item(6, None)
    # diffusers' inpaint pipeline at strength 1 with an all-white mask: the image is all repainted
    as_inpaint = replace(text, init=replace(image_input(1.0), mask=b"\xff" * SIZE * SIZE))
    assert close(alone(inpainting, text), diffusers_image(inpainting, as_inpaint))


def joiners() -> Iterator[GenerationItem]:
    yield item(11, 0.5)  # img2img from step 5 of 10
    yield item(12, 0.7, masked=True)  # inpainting from step 3
    yield item(13, 0.35, masked=True, sampler="euler-a", guidance=1.0)  # one UNet row, step 7


def test_joined_at_their_start_step_image_items_equal_alone(engine: DiffusionEngine) -> None:
    """Continuous: image items join a running text-to-image item of their size, each at its own
    start step, and share every forward pass with it and each other; and the other way round."""
    text = item(10, None, steps=12, sampler="euler")
    images = list(joiners())
    expected = {it: alone(engine, it) for it in (text, *images)}
    joined = run_until_done(engine, engine.prepare([text]), images, join_after=3)
    assert joined.keys() == expected.keys()
    for it, image in joined.items():
        assert close(image, expected[it]), it
    reverse = run_until_done(engine, engine.prepare(images), [text], join_after=1)
    for it, image in reverse.items():
        assert close(image, expected[it]), it
    assert np.abs(expected[images[0]] - expected[images[1]]).max() > 10


def test_whole_batches_of_one_start_step_equal_alone(engine: DiffusionEngine) -> None:
    """Deadline / eager: text-to-image and strength 1 share step 0; two at 0.5 share step 5."""
    for batch in ([item(20, None), item(21, 1.0), item(22, 1.0, masked=True)],
                  [item(23, 0.5), item(24, 0.5, masked=True)]):
        assert len({i.key for i in batch}) == 1
        for it, image in zip(batch, engine.generate(batch), strict=True):
            assert close(pixels(image), alone(engine, it)), it


def test_an_inpainting_unet_batches_text_and_image_items(inpainting: DiffusionEngine) -> None:
    batch = [item(30, None), item(31, 1.0, masked=True), item(32, 1.0)]
    for it, image in zip(batch, inpainting.generate(batch), strict=True):
        assert close(pixels(image), alone(inpainting, it)), it
    joined = run_until_done(inpainting, inpainting.prepare([item(33, None, steps=6)]),
                            [item(34, 0.5, masked=True, steps=6)], join_after=3)
    for it, image in joined.items():
        assert close(image, alone(inpainting, it)), it


def test_init_latents_end_with_their_item(engine: DiffusionEngine) -> None:
    states = engine.prepare([item(40, 0.2, masked=True, steps=5)])
    assert states[0].remaining == 1
    engine.step(states)
    assert states[0].done
    engine.finish(states)
    assert states[0].init is None  # type: ignore[attr-defined]


def served(strength: float | None, seed: int, *, masked: bool = False,
           sampler: str = "euler") -> tuple[dict[str, Any], GenerationItem]:
    """A /t2i body and the item the engine gets from it (decoded and fitted as the door does:
    mask_blur 4, the default)."""
    body: dict[str, Any] = {"prompt": f"a harbour, take {seed}", "seed": seed, "width": SIZE,
                            "height": SIZE, "inference_steps": 8, "sampler": sampler}
    init = None
    if strength is not None:
        picture = encode(gradient(SIZE, SIZE))
        painted = encode(mask(SIZE, SIZE, (8, 16, 40, 56))) if masked else None
        body.update(init_image=b64(picture), strength=strength)
        if painted is not None:
            body["mask_image"] = b64(painted)
        decoded = images.decode(picture, painted, max_pixels=10**6, rule=images.MaskRule.WHITE,
                                init_label="init_image", mask_label="mask_image")
        init = images.fit(decoded, SIZE, SIZE, strength=strength, mask_blur=4)
    return body, GenerationItem(body["prompt"], "", seed, SIZE, SIZE, 8, 7.5, sampler, init)


@pytest.mark.parametrize("policy", ["deadline", "continuous"])
async def test_served_image_requests_equal_alone_in_either_policy(engine: DiffusionEngine,
                                                                  policy: str) -> None:
    """Through HTTP: a text-to-image request, an img2img at strength 1 (step 0, whole-batched
    with it under deadline), and img2img and inpainting at 0.5 (step 4, batched together under
    deadline; joining the running text item under continuous)."""
    cases = [served(None, 1), served(1.0, 2), served(0.5, 3), served(0.5, 4, masked=True)]
    async with in_process(engine, flush_policy=policy,  # type: ignore[arg-type]
                          max_wait_ms=2000, max_batch_size=2) as app:
        answers = await asyncio.gather(*(app.client.post("/t2i", json=body)
                                         for body, _ in cases))
    for (_, it), answer in zip(cases, answers, strict=True):
        assert answer.status_code == 200, answer.text
        got = pixels(Image.open(io.BytesIO(answer.content)).convert("RGB"))
        assert close(got, alone(engine, it)), it
        if policy == "deadline":  # pairs of one start step, full at 2
            assert answer.headers["x-batch-size"] == "2"


def test_an_upcast_encode_runs_in_float32_and_leaves_the_vae_as_it_was() -> None:
    """SDXL's VAE overflows in fp16 (`force_upcast`): its encode runs in float32, the latents
    come back in the image's dtype and the VAE in its own."""
    from batchserve.engines import init_latents, tiny

    vae = tiny.vae().to(torch.bfloat16)
    image = torch.zeros((1, 3, SIZE, SIZE), dtype=torch.bfloat16)
    seen: list[torch.dtype] = []
    encoder = vae.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    latents = init_latents.encode(vae, image, torch.Generator().manual_seed(0), upcast=True)
    encoder.remove()
    assert seen == [torch.float32]  # what the encoder read
    assert latents.dtype == torch.bfloat16 and vae.dtype == torch.bfloat16
    assert latents.shape == (1, 4, SIZE // 8, SIZE // 8)
