"""The step-wise diffusers engine: an item's image does not depend on who shared its steps."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from inprocess import in_process
from PIL import Image

from batchserve.engines import GenerationItem, StepEngine, StepState, step_engine, warm_steps
from batchserve.engines.diffusion import SCHEDULERS, DiffusionEngine, make_scheduler
from batchserve.settings import Settings

# Different steps, guidance (B: <= 1, one UNet row) and negative prompts, one 64x64 shape.
LONG = GenerationItem("a red cube", "blurry", 7, 64, 64, 4, 7.5)
SHORT = GenerationItem("a dog", "", 8, 64, 64, 2, 1.0)
MID = GenerationItem("a cat", "dark", 9, 64, 64, 3, 5.0)
# Over 75 tokens (3 chunks with the tiny byte-level tokenizer): its rows are longer than the
# others' and get padded and masked in the steps it shares.
WORDY = GenerationItem("a lighthouse on a cliff at dusk, " * 6, "", 12, 64, 64, 2, 6.0)


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def run_until_done(engine: StepEngine, states: list[StepState],
                   joiners: Sequence[GenerationItem] = (), join_after: int = 0
                   ) -> dict[GenerationItem, np.ndarray]:
    """Steps `states`; `joiners` join after `join_after` steps; finished items leave at once."""
    images: dict[GenerationItem, np.ndarray] = {}
    steps = 0
    while states or joiners:
        if joiners and steps == join_after:
            states += engine.prepare(joiners)
            joiners = ()
        engine.step(states)
        steps += 1
        done = [s for s in states if s.done]
        if done:
            for state, image in zip(done, engine.finish(done), strict=True):
                images[state.item] = pixels(image)  # type: ignore[attr-defined]
        states = [s for s in states if not s.done]
    return images


@pytest.fixture(scope="module")
def engine() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup=""))


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_joined_part_way_equals_alone_and_static_batch(engine: DiffusionEngine,
                                                       scheduler: str) -> None:
    # the sampler is the items' own (a request field): whole batches and steps both use it
    long, short, mid = (replace(i, sampler=scheduler) for i in (LONG, SHORT, MID))
    stepper = step_engine(engine)
    assert stepper is not None
    alone = {item: pixels(engine.generate([item])[0]) for item in (long, short, mid)}
    twin = GenerationItem("another prompt", "", 11, 64, 64, 3, 5.0, scheduler)  # mid's key
    static = engine.generate([mid, twin])
    assert np.abs(pixels(static[0]) - alone[mid]).max() <= 1
    # long runs one step alone, then short and mid join with other steps and guidance.
    joined = run_until_done(stepper, stepper.prepare([long]), [short, mid], join_after=1)
    for item in (long, short, mid):
        assert np.abs(joined[item] - alone[item]).max() <= 1, item
    solo = run_until_done(stepper, stepper.prepare([short]))
    assert np.abs(solo[short] - alone[short]).max() <= 1
    assert np.abs(alone[long] - alone[mid]).max() > 10  # images differ: the check can fail


def test_items_of_different_samplers_share_steps(engine: DiffusionEngine) -> None:
    items = [replace(SHORT, sampler="euler-a"), replace(LONG, sampler="ddim")]
    alone = {item: pixels(engine.generate([item])[0]) for item in items}
    joined = run_until_done(engine, engine.prepare(items))
    for item in items:
        assert np.abs(joined[item] - alone[item]).max() <= 1, item


def test_long_prompt_shares_steps_with_short_ones(engine: DiffusionEngine) -> None:
    items = [replace(i, sampler="euler-a") for i in (WORDY, SHORT, LONG)]
    wordy, short, long = items
    alone = {item: pixels(engine.generate([item])[0]) for item in items}
    joined = run_until_done(engine, engine.prepare([short, long]), [wordy], join_after=1)
    for item in items:
        assert np.abs(joined[item] - alone[item]).max() <= 1, item


def test_step_wise_warmup_runs_each_shape_at_each_size(engine: DiffusionEngine) -> None:
    ran = warm_steps(engine, [(64, 64, 2), (64, 32, 1)], [1, 2])
    assert [r[:4] for r in ran] == [(64, 64, 2, 1), (64, 64, 2, 2), (64, 32, 1, 1),
                                    (64, 32, 1, 2)]
    assert all(r[4] > 0 for r in ran)


def test_finished_items_leave_while_others_continue(engine: DiffusionEngine) -> None:
    states = engine.prepare([LONG, SHORT])
    engine.step(states)
    engine.step(states)
    assert [s.done for s in states] == [False, True]
    with pytest.raises(TypeError):
        engine.step([object()])  # type: ignore[list-item]


async def test_served_continuously_images_equal_generate(engine: DiffusionEngine) -> None:
    """Through the service and HTTP: two requests of other steps and guidance sharing steps."""
    engine.pipe.scheduler = make_scheduler("dpm++2m-karras", engine.pipe.scheduler.config)
    items = (LONG, SHORT)
    async with in_process(engine, flush_policy="continuous") as app:  # type: ignore[arg-type]
        responses = await asyncio.gather(*(app.client.post("/t2i", json={
            "prompt": i.prompt, "negative_prompt": i.negative_prompt, "seed": i.seed,
            "width": i.width, "height": i.height, "inference_steps": i.inference_steps,
            "guidance_scale": i.guidance_scale}) for i in items))
    for item, response in zip(items, responses, strict=True):
        assert response.status_code == 200
        served = pixels(Image.open(io.BytesIO(response.content)).convert("RGB"))
        assert np.abs(served - pixels(engine.generate([item])[0])).max() <= 1
