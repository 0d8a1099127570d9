"""`--model sim`: a benchmark-only engine whose batch of n sleeps base + n*per_image ms.

It uses no CPU while "generating", so the serving path can be measured alone (base = per_image = 0
is a null engine) or a GPU's timing can be replayed on a machine without one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import lru_cache

from PIL import Image

from ..errors import Interrupted
from .protocol import EngineInfo, GenerationItem, StopCheck, Switch


@lru_cache(maxsize=16)
def _fixed_image(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (127, 127, 127))


class SimEngine:
    def __init__(self, *, base_ms: float, per_image_ms: float) -> None:
        self.base_ms = base_ms
        self.per_image_ms = per_image_ms

    def info(self) -> EngineInfo:
        return EngineInfo(
            model="sim",
            device="none",
            dtype="none",
            attention="none",
            scheduler="none",
            demo=True,
            tuning=(
                Switch("simulated", True, f"{self.base_ms} ms + {self.per_image_ms} ms/image"),
            ),
        )

    def warmup(self) -> None:
        return None  # nothing to warm; the batch-time model learns from the first batches

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None
    ) -> list[Image.Image]:
        """Sleeps its batch time in one slice per denoising step, checking `should_stop`
        after each, as the diffusers engine does."""
        steps = max(1, items[0].inference_steps)
        step_s = (self.base_ms + self.per_image_ms * len(items)) / 1000.0 / steps
        for step in range(steps):
            if step_s > 0:
                time.sleep(step_s)
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped after step {step + 1} of {steps}")
        return [_fixed_image(i.width, i.height) for i in items]

    def memory_bytes(self) -> tuple[int, int] | None:
        return None
