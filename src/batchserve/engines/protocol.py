"""What the batcher calls: the `Engine` protocol and the types crossing it. No torch here."""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image

BatchKey = (tuple[int, int, int, float, str] | tuple[int, int, int, float, str, int]
            | tuple[int, int, int, float, str, int, float])
"""(width, height, inference_steps, guidance_scale, sampler[, start_step[, refiner_switch]]):
items sharing it share a forward pass. An item that starts from an init image past step 0 adds
its start step (`GenerationItem.start_step`): a whole batch runs one schedule, so only items
starting at the same step can share it. An item handed to the refiner adds its switch (and a
start step, 0 for text-to-image): the whole batch changes UNet at one step."""

StopCheck = Callable[[], bool]
"""Polled by an engine between denoising steps; true means nobody waits for the batch."""

Preview = Callable[[int], bytes | None]
"""Row `i`'s preview at this step (a small JPEG from a linear latent-to-RGB projection, no VAE
pass), computed only when called; None where the family has no projection."""

OnStep = Callable[[int, int, Preview | None], None]
"""Called by `generate` (when it takes `on_step`) after each denoising step: (steps done,
steps in all, the step's previews). Runs on the engine thread: it must return quickly."""


def exact(number: float) -> str:
    """A float as short as `:g` writes it when that is exact (7.5, 7), else its shortest
    round-trip form: `:g` keeps 6 digits, so two keys (7.1234561, 7.1234562) shared one label,
    and forgetting one key's series removed the other's."""
    short = f"{number:g}"
    return short if float(short) == number else repr(float(number))


def key_label(key: BatchKey) -> str:
    """The batching key as logs and metric labels show it (no user text):
    `512x512x20x7.5/euler-a` (no sampler part for the engine's default, ""), and
    `512x512x20x7.5@5/euler-a` for items joining at step 5 (img2img, inpainting)."""
    width, height, steps, guidance, sampler = key[:5]
    label = f"{width}x{height}x{steps}x{exact(guidance)}"
    if len(key) > 5 and key[5]:
        label += f"@{key[5]}"
    if len(key) > 6:
        label += f"+refiner@{exact(key[6])}"
    return f"{label}/{sampler}" if sampler else label


@dataclass(frozen=True, slots=True)
class ImageInput:
    """What an item starts from instead of pure noise: an init image (img2img) and, for
    inpainting, its mask, both decoded and already fitted to the item's width x height by
    `batchserve.images` (oriented, RGB / L, stretched, the mask blurred). No torch here; the
    engine turns them into tensors with `engines.inputs`.

    The engine's contract: encode `rgb` with the VAE (the item's own generator), noise it to the
    timestep of `start_step(steps)` with the item's own noise, and run the remaining steps; with
    a `mask`, keep the unmasked region (diffusers' inpainting: the latent mask blended back at
    every step on a 4-channel UNet, or the 9-channel inpainting UNet's own inputs)."""

    width: int
    height: int
    rgb: bytes = field(repr=False)
    """width * height * 3 bytes: RGB8, rows top to bottom."""
    strength: float
    """0 < strength <= 1: how much of the image is repainted (diffusers' and A1111's meaning)."""
    mask: bytes | None = field(default=None, repr=False)
    """width * height bytes (L8): 255 repaint, 0 keep; blurred by `mask_blur` already."""
    mask_blur: int = 0
    """The Gaussian radius the mask was blurred by (already applied; for the record)."""

    def start_step(self, steps: int) -> int:
        """The step this item joins a schedule of `steps` at: `steps - int(steps * strength)`,
        exactly as diffusers' img2img and inpaint pipelines compute it (`get_timesteps`)."""
        return steps - min(int(steps * self.strength), steps)


@dataclass(frozen=True, slots=True)
class LoraPick:
    """One adapter a request asked for: a file of `--lora-dir` by name, at a scale."""

    name: str
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class GenerationItem:
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    inference_steps: int
    guidance_scale: float
    sampler: str = ""
    """One of `samplers.SAMPLERS`; "" is the engine's default (`--scheduler`)."""
    init: ImageInput | None = None
    """img2img / inpainting: what the item starts from (None: text-to-image, from noise)."""
    refiner_switch: float = 0.0
    """0 < x < 1: the fraction of the steps after which the SDXL refiner (`--refiner`) takes
    over (the base's `denoising_end`, the refiner's `denoising_start`); 0: no refiner."""
    loras: tuple[LoraPick, ...] = ()
    """Per-request LoRA, applied to this item's rows only; never part of the batching key."""

    @property
    def start_step(self) -> int:
        """The denoising step the item starts at (0 for text-to-image); it runs
        `inference_steps - start_step` steps."""
        return 0 if self.init is None else self.init.start_step(self.inference_steps)

    @property
    def key(self) -> BatchKey:
        base = (self.width, self.height, self.inference_steps, self.guidance_scale, self.sampler)
        start = self.start_step
        if self.refiner_switch:
            return (*base, start, self.refiner_switch)
        return (*base, start) if start else base


@dataclass(frozen=True, slots=True)
class Switch:
    """One tuning switch as applied, with the reason when it is off."""

    name: str
    enabled: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str
    device: str
    dtype: str
    attention: str
    scheduler: str
    demo: bool = False
    tuning: tuple[Switch, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "attention_backend": self.attention,
            "scheduler": self.scheduler,
            "demo_model": self.demo,
            "tuning": {s.name: {"enabled": s.enabled, "detail": s.detail} for s in self.tuning},
            **self.extra,
        }


class Engine(Protocol):
    """Generates one batch at a time; always called from one dedicated worker thread."""

    def info(self) -> EngineInfo: ...

    def warmup(self) -> Mapping[BatchKey, float] | None:
        """Runs each warm-up shape once; returns its seconds per key (a batch of one), which
        seed the scheduler's batch-time model, or None."""
        ...

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None
    ) -> list[Image]:
        """One image per item, in order; an item's image depends only on that item.

        Raises `errors.EngineOutOfMemory` when the batch does not fit in device memory, and
        `errors.Interrupted` between two denoising steps once `should_stop()` is true.
        Engines that report progress also take `on_step: OnStep | None` (the service looks at
        the signature once: `reports_steps`).
        """
        ...

    def memory_bytes(self) -> tuple[int, int] | None:
        """(peak allocated during the last batch, reserved) device memory, or None where there
        is no GPU. The peak, not the memory held between batches, is what sizes a batch."""
        ...


class StepState(Protocol):
    """One prepared item inside a step-wise engine: its own latents, scheduler and generator."""

    @property
    def item(self) -> GenerationItem: ...

    @property
    def done(self) -> bool:
        """True once every denoising step of its schedule has run."""
        ...

    @property
    def remaining(self) -> int:
        """Denoising steps of its schedule still to run (0 once done)."""
        ...


@runtime_checkable
class StepEngine(Protocol):
    """Optional, beside `Engine.generate`: denoising one UNet step at a time, so items can join
    and leave a running batch between steps (`--flush-policy continuous`). Called from the same
    single worker thread as `generate`.

    An item's image must equal what `generate([item])` makes (uint8, +-1 on CPU float32),
    whichever items shared its steps and whenever it joined.
    """

    def prepare(self, items: Sequence[GenerationItem]) -> list[StepState]:
        """Text embeddings, initial latents from the item's own seed, its own scheduler."""
        ...

    def step(self, states: Sequence[StepState]) -> None:
        """One denoising step for every state (all of one width x height, none done), in one
        forward pass whatever their steps, guidance or position in their schedules.

        Raises `errors.EngineOutOfMemory` without changing any state when they do not fit.
        """
        ...

    def finish(self, states: Sequence[StepState]) -> list[Image]:
        """Decodes done states (one batch), one image per state, in order."""
        ...


def reports_steps(engine: object) -> bool:
    """Whether `engine.generate` takes `on_step` (progress of whole batches)."""
    generate = getattr(engine, "generate", None)
    if generate is None:
        return False
    try:
        return "on_step" in inspect.signature(generate).parameters
    except (TypeError, ValueError):
        return False


@runtime_checkable
class PreviewsSteps(Protocol):
    """Optional, beside `StepEngine`: a running item's preview between steps."""

    def preview(self, state: StepState) -> bytes | None: ...


def step_engine(engine: object) -> StepEngine | None:
    """`engine` as a `StepEngine` when it offers the step-wise interface, else None."""
    return engine if isinstance(engine, StepEngine) else None


@dataclass(eq=False, slots=True)
class StepRound:
    """What `run_round` did: each phase's result or its error (a failed phase is the caller's
    to handle; later phases that depended on it did not run)."""

    joined: list[StepState] | None = None  # states of the joiners; None when prepare failed
    join_error: Exception | None = None
    steps: int = 0  # steps that ran for every stepping state (a failed one not counted)
    step_error: Exception | None = None
    images: list[Image] | None = None
    """One per decoded state: the held (`finishing`), then the newly done in stepping order;
    None: nothing was decoded (none done, or fewer than `hold`)."""
    finish_error: Exception | None = None

    @property
    def stepped(self) -> bool:
        return self.step_error is None


def run_round(engine: StepEngine, joining: Sequence[GenerationItem],
              active: Sequence[StepState], until: Callable[[], bool] | None = None,
              after_step: Callable[[Sequence[StepState]], None] | None = None,
              finishing: Sequence[StepState] = (), hold: int = 0,
              ahead: Sequence[GenerationItem] = (),
              ) -> StepRound:
    """One iteration of continuous batching in ONE call on the engine thread: `joining` are
    prepared, then steps run for `active` plus the joiners (if prepare failed, for `active`
    alone) until a state is done, a step fails, or `until()` says the scheduler has something
    to change (checked after each step; None: one step); then `finishing` (done states held
    from earlier rounds) and the newly done are decoded together, once there are at least
    `hold` of them (fewer: none is decoded, and the caller holds the newly done too).
    `ahead`: queued items likely to join soon, whose prompts an engine with `encode_ahead`
    encodes now in one call with each other (at saturation joiners come one at a time, and a
    text encoder's call for one prompt costs nearly what it costs for eight).

    Steps run back to back while nothing changes, so the engine does not wait for the event
    loop between them: a hop to the loop and back costs little on an idle host but a whole
    scheduling slice when the loop's CPU is busy (HTTP, encoding), and the engine idles
    meanwhile. `after_step(stepping)` (active, then the joiners) reports each step."""
    out = StepRound()
    encode_ahead = getattr(engine, "encode_ahead", None)
    if ahead and encode_ahead is not None:
        # only a head start: `prepare` encodes what it needs, or says why it cannot
        with contextlib.suppress(Exception):
            encode_ahead([*joining, *ahead])
    if joining:
        try:
            out.joined = engine.prepare(joining)
        except Exception as exc:
            out.join_error = exc
    stepping = [*active, *(out.joined or ())]
    done: list[StepState] = []
    while stepping:
        try:
            engine.step(stepping)
        except Exception as exc:
            out.step_error = exc
            return out
        out.steps += 1
        if after_step is not None:
            after_step(stepping)
        done = [s for s in stepping if s.done]
        if done or until is None or until():
            break
    waiting = [*finishing, *done]
    if waiting and len(waiting) >= hold:
        try:
            out.images = engine.finish(waiting)
        except Exception as exc:
            out.finish_error = exc
    return out


def warm_batches(generate: Callable[[list[GenerationItem]], object],
                 shapes: Sequence[tuple[int, int, int]], sizes: Sequence[int], sampler: str,
                 log: Callable[..., None]) -> dict[BatchKey, float]:
    """A whole-batch engine's warm-up: each shape (width, height, steps) at each batch size
    through `generate`, so kernels are tuned and compiled before /readyz turns 200. Returns
    each shape's time at batch size 1 (when warmed at 1), which seeds the adaptive batch-time
    model; `sampler` by name, as requests' batches are keyed."""
    timings: dict[BatchKey, float] = {}
    for w, h, steps in shapes:
        for n in sizes:
            items = [GenerationItem("warm-up", "", seed, w, h, steps, 7.5, sampler)
                     for seed in range(n)]
            started = time.perf_counter()
            generate(items)
            seconds = time.perf_counter() - started
            if n == 1:
                timings[items[0].key] = seconds
            log("warm-up %dx%dx%d at batch size %d took %.2f s", w, h, steps, n, seconds)
    return timings


def warm_steps(engine: StepEngine, shapes: Sequence[tuple[int, int, int]],
               sizes: Sequence[int], sampler: str = "") -> list[tuple[int, int, int, int, float]]:
    """The warm-up of the `continuous` policy: each shape (width, height, steps) at each batch
    size through prepare / step / finish, the calls that policy makes, so the UNet's step-path
    batches (one row per item per guidance half) are tuned and compiled before /readyz turns
    200. The whole-batch `Engine.warmup` would warm `generate`, which that policy never calls.
    Returns (width, height, steps, size, seconds) for each run, for the log; raises what a run
    raised."""
    ran = []
    for width, height, steps in shapes:
        for size in sizes:
            items = [GenerationItem("warm-up", "", seed, width, height, steps, 7.5, sampler)
                     for seed in range(size)]
            started = time.perf_counter()
            # The very call the policy makes; the items share one schedule, so it runs them to
            # the end together.
            done = run_round(engine, items, [], until=lambda: False)
            for error in (done.join_error, done.step_error, done.finish_error):
                if error is not None:
                    raise error
            ran.append((width, height, steps, size, time.perf_counter() - started))
    return ran
