"""`--model sim`: a benchmark-only engine that sleeps like a GPU and draws a flat grey image.

An item with an init image (img2img, inpainting) runs only its steps from its start step, as a
real engine does, and gives back its init image unchanged: a no-op edit, which lets tests see
that the image crossed every door, queue and store intact.

Two cost models, which add up: per batch (a batch of n sleeps base + n*per_image ms) and per
denoising step (one step of n items sleeps step + n*step_per_image ms, so a static batch of s
steps sleeps s times that). The step model is also offered step-wise (`StepEngine`), so the
`continuous` policy can replay a GPU's timing. It uses no CPU while "generating", so the serving
path can be measured alone (all zero is a null engine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from PIL import Image

from ..errors import Interrupted
from .protocol import EngineInfo, GenerationItem, OnStep, StepState, StopCheck, Switch


@lru_cache(maxsize=16)
def _fixed_image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (127, 127, 127))


def _steps(item: GenerationItem) -> int:
    """The steps an item runs: from its start step (img2img) to the end of its schedule."""
    return item.inference_steps - item.start_step


def _image(item: GenerationItem) -> Image.Image:
    if item.init is not None:
        return Image.frombytes("RGB", (item.init.width, item.init.height), item.init.rgb)
    return _fixed_image(item.width, item.height)


def _sleep_ms(ms: float, should_stop: StopCheck | None = None) -> None:
    """Sleeps `ms`; with `should_stop`, in slices of at most 50 ms that end early once it is
    true: a simulated "step" may last seconds, and a stopping server joins this thread."""
    end = time.monotonic() + ms / 1000.0
    while (left := end - time.monotonic()) > 0:
        if should_stop is not None and should_stop():
            return
        time.sleep(left if should_stop is None else min(left, 0.05))


@dataclass(eq=False, slots=True)
class SimState:
    item: GenerationItem
    remaining: int

    @property
    def done(self) -> bool:
        return self.remaining <= 0


class SimEngine:
    def __init__(self, *, base_ms: float, per_image_ms: float, step_ms: float = 0.0,
                 step_per_image_ms: float = 0.0) -> None:
        self.base_ms = base_ms
        self.per_image_ms = per_image_ms
        self.step_ms = step_ms
        self.step_per_image_ms = step_per_image_ms

    def info(self) -> EngineInfo:
        return EngineInfo(
            model="sim",
            device="none",
            dtype="none",
            attention="none",
            scheduler="none",
            demo=True,
            tuning=(
                Switch("simulated", True, f"{self.base_ms} ms + {self.per_image_ms} ms/image"
                       f" per batch; {self.step_ms} ms + {self.step_per_image_ms} ms/image"
                       " per step"),
            ),
        )

    def warmup(self) -> None:
        return None  # nothing to warm; the batch-time model learns from the first batches

    def _step_ms(self, n: int) -> float:
        return self.step_ms + self.step_per_image_ms * n

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None,
        on_step: OnStep | None = None,
    ) -> list[Image.Image]:
        """Sleeps its batch time in one slice per denoising step (the per-batch time spread
        over the steps, plus the step model's time), reporting each step and checking
        `should_stop` after it, as the diffusers engine does (no previews: no latents)."""
        n, steps = len(items), max(1, _steps(items[0]))
        slice_ms = (self.base_ms + self.per_image_ms * n) / steps + self._step_ms(n)
        for step in range(steps):
            _sleep_ms(slice_ms, should_stop)
            if on_step is not None:
                on_step(step + 1, steps, None)
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped after step {step + 1} of {steps}")
        return [_image(i) for i in items]

    def use_loras(self, library: Any, events: Any = None) -> None:
        """Per-request LoRA names are served (checked against `--lora-dir`'s listing); the
        replayed step costs do not change with them: the sim measures batching, and per-row
        adapters cost a few percent of a step on a GPU (docs/benchmarks.md, issue 21)."""
        library.attach(None)

    def prepare(self, items: Sequence[GenerationItem]) -> list[StepState]:
        return [SimState(item, _steps(item)) for item in items]

    def step(self, states: Sequence[StepState]) -> None:
        _sleep_ms(self._step_ms(len(states)))
        for state in states:
            if isinstance(state, SimState):
                state.remaining -= 1

    def finish(self, states: Sequence[StepState]) -> list[Image.Image]:
        return [_image(s.item) for s in states if isinstance(s, SimState)]

    def memory_bytes(self) -> tuple[int, int] | None:
        return None
