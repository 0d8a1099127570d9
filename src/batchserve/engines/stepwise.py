"""The step-wise diffusers engine: Stable Diffusion's denoising loop taken apart, one UNet step at
a time for any set of items of one width x height, the same for every model family (what a family
adds, its text conditioning and extra UNet inputs, comes from its `families` module as `Row`s).

Each item carries what `StableDiffusionPipeline.__call__` keeps for the whole batch: its own
scheduler instance (from the pipeline's scheduler config, so multistep DPM++ history and Heun's
second-order state are per item), its own generator (initial latents, then the noise ancestral
samplers draw in `scheduler.step`), its own timesteps and guidance. One forward pass takes a
timestep per row; an item with guidance > 1 contributes two rows (unconditional, text), one with
guidance <= 1 a single row. Every per-item operation mirrors the pipeline's, so an item's image
equals what the pipeline makes for it alone (up to float rounding of batched kernels).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL.Image import Image

from ..errors import EngineOutOfMemory
from . import init_latents
from .families.base import Family, Row
from .init_latents import InitLatents
from .lora.rows import Choice
from .lora.runtime import LoraRuntime
from .protocol import GenerationItem, StepState
from .vector_steps import Update, step_all

SchedulerFactory = Callable[[GenerationItem], Any]
"""A fresh scheduler for the item, its `inference_steps` timesteps already set."""


@dataclass(eq=False, slots=True)
class HandOff:
    """An item's refiner stage, planned at prepare: a fresh scheduler (as the refiner pipeline
    builds its own), its timesteps from `denoising_start` on, and the refiner's rows."""

    scheduler: Any
    timesteps: torch.Tensor
    rows: list[Row]
    step_kwargs: dict[str, Any]


@dataclass(eq=False, slots=True)
class DiffusionState:
    item: GenerationItem
    scheduler: Any
    generator: torch.Generator
    latents: torch.Tensor
    rows: list[Row]
    """Its UNet rows (conditioning [1, L, D], padding mask [L], the family's extra inputs):
    (negative, prompt) with guidance, (prompt,) without, as the pipeline orders them."""
    timesteps: torch.Tensor
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    lora: Choice = ()
    """Its per-request LoRA (resident adapter keys and scales), for each of its rows."""
    init: InitLatents | None = None
    """An item started from an image: what its UNet rows and steps also need (`init_latents`)."""
    stage: int = 0
    """Which UNet its rows go through: 0 the base, 1 the SDXL refiner."""
    hand_off: HandOff | None = None
    """The refiner stage still to come (None: none, or already in it)."""
    times: list[float] = field(init=False)
    """`timesteps` as numbers: a step's rows get theirs in one tensor, not one op per row."""

    def __post_init__(self) -> None:
        self.times = self.timesteps.tolist()

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps) and self.hand_off is None

    @property
    def remaining(self) -> int:
        later = 0 if self.hand_off is None else len(self.hand_off.timesteps)
        return max(0, len(self.timesteps) - self.index) + later


class StepwiseDiffusion:
    """Prepare / step / finish over a loaded pipeline of any family."""

    def __init__(self, pipe: Any, device: str, scheduler_for: SchedulerFactory,
                 family: Family, refiner: Any = None, refiner_family: Any = None,
                 lora: LoraRuntime | None = None) -> None:
        self.pipe = pipe
        self.device = torch.device(device)
        self.scheduler_for = scheduler_for
        self.family = family
        self.lora = lora
        self.refiner, self.refiner_family = refiner, refiner_family
        """The SDXL refiner's pipeline and conditioning (`families.sdxl.Refiner`): the
        second stage of items with a `refiner_switch`."""
        self.inpainting_unet = init_latents.is_inpainting_unet(pipe.unet)
        self._cond: tuple[tuple[Any, ...], torch.Tensor, dict[str, Any], list[Any]] | None = None
        """`_conditioning`'s last: (key, embeds, UNet keyword arguments, the states it was
        made for, kept alive so their ids cannot be reused while the key holds them)."""

    def _unet(self, stage: int) -> Any:
        return self.pipe.unet if stage == 0 else self.refiner.unet

    def prepare(self, items: Sequence[GenerationItem]) -> list[StepState]:
        with torch.inference_mode(), _oom_guard(self):
            states: list[StepState] = []
            for item in items:
                # A joiner brings its adapters: resolved (loaded if need be) as it joins.
                lora = self.lora.choice(item) if self.lora is not None and item.loras else ()
                states.append(self._prepare_one(item, self._encode(item, lora), lora))
            return states

    def encode_ahead(self, items: Sequence[GenerationItem]) -> None:
        """Encodes the prompts of `items` (those without per-request LoRA) in one call per text
        encoder and guidance kind, so that each one's own encoding when it joins finds its
        rows in the encoders' row cache (`PromptEncoder._cached_rows`)."""
        with torch.inference_mode(), _oom_guard(self):
            for guided in (True, False):
                group = [i for i in items if not i.loras and self._guided(i) == guided]
                if not group:
                    continue
                prompts, negatives = [i.prompt for i in group], [i.negative_prompt for i in group]
                for encoder in self.family.encoders:
                    encoder.encode(prompts, negatives, guidance=guided)

    def _encode(self, item: GenerationItem, lora: Choice = ()) -> list[Row]:
        """The item's rows, encoded alone by its family (as in `generate`, its LoRA's text
        encoder part included); padding across items happens per step."""
        return self.family.rows(item, guided=self._guided(item), lora=lora)

    def _guided(self, item: GenerationItem, stage: int = 0) -> bool:
        # the pipeline's `do_classifier_free_guidance`
        return (item.guidance_scale > 1
                and self._unet(stage).config.time_cond_proj_dim is None)

    def _prepare_one(self, item: GenerationItem, rows: list[Row],
                     lora: Choice = ()) -> DiffusionState:
        pipe = self.pipe
        scheduler = self.scheduler_for(item)
        timesteps = init_latents.timesteps_from(scheduler, item)
        generator = torch.Generator(self.device.type).manual_seed(item.seed)
        shape = (1, pipe.vae.config.latent_channels, item.height // pipe.vae_scale_factor,
                 item.width // pipe.vae_scale_factor)
        latents, init = init_latents.start(
            item, vae=pipe.vae, scheduler=scheduler, generator=generator, timesteps=timesteps,
            shape=shape, dtype=rows[0][0].dtype, device=self.device,
            inpainting_unet=self.inpainting_unet, vae_scale_factor=pipe.vae_scale_factor,
            upcast=self.family.upcast_vae)
        hand_off = None
        if item.refiner_switch:
            timesteps = timesteps[:_base_steps(scheduler, timesteps, item.refiner_switch)]
            hand_off = self._plan_hand_off(item, generator)
        state = DiffusionState(
            item=item, scheduler=scheduler, generator=generator, latents=latents, rows=rows,
            timesteps=timesteps, step_kwargs=_step_kwargs(scheduler, generator), init=init,
            hand_off=hand_off, lora=lora,
        )
        _maybe_hand_off(state)
        return state

    def _plan_hand_off(self, item: GenerationItem, generator: torch.Generator) -> HandOff:
        """The refiner stage as `StableDiffusionXLImg2ImgPipeline` runs it with
        `denoising_start=refiner_switch` (`get_timesteps`): a fresh scheduler whose timesteps
        below the cut-off remain (one more for a second-order sampler cut mid-step), its begin
        index set there."""
        if self.refiner is None or self.refiner_family is None:
            raise ValueError("refiner_switch: no refiner loaded (--refiner)")
        scheduler = self.scheduler_for(item)
        begin = len(scheduler.timesteps) - _refiner_steps(scheduler, item.refiner_switch)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        rows = self.refiner_family.rows(item, guided=self._guided(item, stage=1))
        return HandOff(scheduler, scheduler.timesteps[begin:], rows,
                       _step_kwargs(scheduler, generator))

    def step(self, states: Sequence[StepState]) -> None:
        """One denoising step of every state: one UNet forward per stage (the base's rows
        together, the refiner's together), then each item's own scheduler update."""
        active = [_state(s) for s in states]
        stages: dict[int, list[DiffusionState]] = {}
        for state in active:
            stages.setdefault(state.stage, []).append(state)
        predicted: dict[int, torch.Tensor] = {}
        with torch.inference_mode(), _oom_guard(self):
            for stage, group in stages.items():
                for state, pred in zip(group, self._predict(stage, group), strict=True):
                    predicted[id(state)] = pred
        noise = [predicted[id(state)] for state in active]
        # Only after the forward passes succeeded: an OOM above leaves every state unchanged.
        with torch.inference_mode():
            updates = [Update(state.scheduler, pred, state.timesteps[state.index], state.latents,
                              state.step_kwargs) for state, pred in zip(active, noise, strict=True)]
            for state, latents in zip(active, step_all(updates), strict=True):
                state.latents = latents
                if state.init is not None:
                    state.latents = state.init.after_step(state.latents, state.scheduler,
                                                          state.timesteps, state.index)
                state.index += 1
                _maybe_hand_off(state)

    def _predict(self, stage: int, states: list[DiffusionState]) -> list[torch.Tensor]:
        samples, times = [], []
        for state in states:
            t = state.timesteps[state.index]
            x = state.scheduler.scale_model_input(state.latents, t)
            if state.init is not None:
                x = state.init.model_input(x)
            samples += [x] * len(state.rows)
            times += [state.times[state.index]] * len(state.rows)
        embeds, kwargs = self._conditioning(stage, states)
        choices = [s.lora for s in states for _ in s.rows]
        with contextlib.ExitStack() as stack:
            # per-request LoRA is the base model's: the refiner stage runs as loaded
            if stage == 0 and self.lora is not None and any(choices):
                stack.enter_context(self.lora.unet_rows(choices))
            out = self._unet(stage)(
                torch.cat(samples),
                # one tensor for the rows' timesteps (float32, as `t.to(float32)` gives them)
                torch.tensor(times, dtype=torch.float32, device=self.device),
                encoder_hidden_states=embeds, return_dict=False, **kwargs,
            )[0]
        return _guide(out, states)

    def _conditioning(self, stage: int, states: list[DiffusionState]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The rows' conditioning side by side (padded and masked, the family's extra inputs
        concatenated), made again only when the batch's items or their rows change: steps
        that run back to back between joins and finishes reuse it."""
        key = (stage, *((id(s), id(s.rows)) for s in states))
        if self._cond is not None and self._cond[0] == key:
            return self._cond[1], self._cond[2]
        rows = [row for state in states for row in state.rows]
        embeds, mask = _pad_rows(rows)
        kwargs: dict[str, Any] = {} if mask is None else {"encoder_attention_mask": mask}
        if rows[0].added:
            kwargs["added_cond_kwargs"] = {
                name: torch.cat([row.added[name] for row in rows if row.added])
                for name in rows[0].added
            }
        self._cond = (key, embeds, kwargs, states)  # `states` kept: their ids stay theirs
        return embeds, kwargs

    def finish(self, states: Sequence[StepState]) -> list[Image]:
        self._cond = None  # the batch changes: its conditioning (and states) are let go
        done = [_state(s) for s in states]
        pipe = self.pipe
        with torch.inference_mode(), _oom_guard(self):
            latents = torch.cat([s.latents for s in done])
            image = _decode(pipe.vae, latents, upcast=self.family.upcast_vae)
            images: list[Image] = pipe.image_processor.postprocess(
                image, output_type="pil", do_denormalize=[True] * len(done)
            )
        for state in done:
            state.init = None  # an image item's init latents end with it, whoever holds the state
        return images

    def free_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    """`prepare_extra_step_kwargs`: eta 0 and the item's generator where the sampler takes
    them."""
    params = _step_parameters(scheduler.__class__)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


@functools.cache
def _step_parameters(scheduler: Any) -> frozenset[str]:
    """The parameters of a scheduler class's `step` (read once per class, not per joiner)."""
    return frozenset(inspect.signature(scheduler.step).parameters)


def _cutoff(scheduler: Any, fraction: float) -> int:
    """The discrete timestep at `fraction` of the schedule (SDXL's `denoising_end` and
    `denoising_start`)."""
    total: int = scheduler.config.num_train_timesteps
    return round(total - fraction * total)


def _base_steps(scheduler: Any, timesteps: torch.Tensor, switch: float) -> int:
    """The base's steps before the hand-off: those at or above the cut-off (the SDXL
    pipeline's `denoising_end`)."""
    return int((timesteps >= _cutoff(scheduler, switch)).sum())


def _refiner_steps(scheduler: Any, switch: float) -> int:
    """The refiner's steps from the hand-off (`get_timesteps` with `denoising_start`): the
    timesteps below the cut-off, one more for a second-order sampler cut mid-step."""
    count = int((scheduler.timesteps < _cutoff(scheduler, switch)).sum())
    return count + 1 if scheduler.order == 2 and count % 2 == 0 else count


def stage_steps(scheduler: Any, switch: float) -> tuple[int, int]:
    """The base's and the refiner's steps of a hand-off at `switch`, as the two SDXL
    pipelines run them; `scheduler` has its timesteps set."""
    return (_base_steps(scheduler, scheduler.timesteps, switch),
            _refiner_steps(scheduler, switch))


def _maybe_hand_off(state: DiffusionState) -> None:
    """At its hand-off step an item's state moves to the refiner: its latents go on with the
    refiner's scheduler, timesteps and rows (the refiner pipeline adds no noise when it
    starts from `denoising_start`); its generator continues."""
    hand_off = state.hand_off
    if hand_off is None or state.index < len(state.timesteps):
        return
    state.scheduler, state.timesteps = hand_off.scheduler, hand_off.timesteps
    state.times = hand_off.timesteps.tolist()
    state.rows, state.step_kwargs = hand_off.rows, hand_off.step_kwargs
    state.index, state.stage, state.hand_off = 0, 1, None


def _guide(out: torch.Tensor, states: list[DiffusionState]) -> list[torch.Tensor]:
    """Each item's noise prediction from its rows of the UNet's output: the pipeline's
    `uncond + g * (text - uncond)` with guidance, its one row without. When every item is
    guided, all in three batched operations (the same elementwise arithmetic, each item's
    guidance broadcast over its own rows only) instead of three per item."""
    if all(len(state.rows) == 2 for state in states):
        pairs = out.unflatten(0, (len(states), 2))
        scales = torch.tensor([state.item.guidance_scale for state in states],
                              dtype=out.dtype, device=out.device)
        uncond, text = pairs[:, 0], pairs[:, 1]
        guided = uncond + scales.view(-1, *[1] * (out.dim() - 1)) * (text - uncond)
        return list(guided.split(1))
    preds, row = [], 0
    for state in states:
        if len(state.rows) == 1:
            preds.append(out[row : row + 1])
        else:
            uncond, text = out[row : row + 1], out[row + 1 : row + 2]
            preds.append(uncond + state.item.guidance_scale * (text - uncond))
        row += len(state.rows)
    return preds


def _pad_rows(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of different lengths (long prompts in 77-token chunks) padded to the longest and
    masked, so padded positions get no attention, as `prompts.stack` does for whole batches.
    The mask is None when no row is padded."""
    length = max(row.embeds.shape[1] for row in rows)
    embeds, masks = [], []
    for embed, mask, _ in rows:
        own = embed.shape[1]
        if mask is None:
            mask = torch.ones(own, dtype=torch.bool, device=embed.device)
        if own < length:
            embed = torch.cat([embed, embed.new_zeros((1, length - own, embed.shape[2]))], 1)
            mask = torch.cat([mask, mask.new_zeros(length - own)])
        embeds.append(embed)
        masks.append(mask)
    stacked = torch.stack(masks)
    return torch.cat(embeds), None if bool(stacked.all()) else stacked


def _decode(vae: Any, latents: torch.Tensor, *, upcast: bool) -> torch.Tensor:
    """The VAE decode of the family's pipeline: SDXL's decodes in float32 when its fp16 VAE
    asks (`force_upcast`: SDXL's VAE overflows in fp16), then goes back to fp16."""
    if not (upcast and vae.dtype == torch.float16 and vae.config.force_upcast):
        decoded: torch.Tensor = vae.decode(latents / vae.config.scaling_factor,
                                           return_dict=False)[0]
        return decoded
    vae.to(dtype=torch.float32)
    try:
        decoded = vae.decode(latents.float() / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        vae.to(dtype=torch.float16)
    return decoded


def _state(state: StepState) -> DiffusionState:
    if not isinstance(state, DiffusionState):
        raise TypeError(f"not a state of this engine: {type(state).__name__}")
    return state


@contextlib.contextmanager
def _oom_guard(engine: StepwiseDiffusion) -> Iterator[None]:
    """Turns torch's out-of-memory into the domain error, after freeing the cache."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        engine.free_cache()
        raise EngineOutOfMemory(str(exc)) from None
