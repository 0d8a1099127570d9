"""A fake engine whose batches are held behind events, so tests decide when a batch ends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from batchserve.engines import EngineInfo, GenerationItem


class FakeEngine:
    """Records every batch; `gate` (when set) blocks `generate` until the test opens it.

    `fail` may raise for a given batch to inject faults.
    """

    def __init__(
        self,
        *,
        gate: threading.Event | None = None,
        fail: Callable[[Sequence[GenerationItem]], None] | None = None,
    ) -> None:
        self.gate = gate
        self.fail = fail
        self.batches: list[list[GenerationItem]] = []
        self.started = threading.Event()
        self.warmed = False

    def info(self) -> EngineInfo:
        return EngineInfo("fake", "cpu", "fp32", "none", "none")

    def warmup(self) -> None:
        self.warmed = True

    def generate(self, items: Sequence[GenerationItem]) -> list[Image.Image]:
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail is not None:
            self.fail(items)
        return [Image.new("RGB", (i.width, i.height), (i.seed % 256, 0, 0)) for i in items]

    def memory_bytes(self) -> tuple[int, int] | None:
        return None


class FakeStepState:
    def __init__(self, item: GenerationItem) -> None:
        self.item = item
        self.remaining = item.inference_steps

    @property
    def done(self) -> bool:
        return self.remaining <= 0


class FakeStepEngine(FakeEngine):
    """A `FakeEngine` that also offers the step-wise interface; `gate` holds every step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: list[list[int]] = []  # seeds in each step

    def prepare(self, items: Sequence[GenerationItem]) -> list[FakeStepState]:
        return [FakeStepState(i) for i in items]

    def step(self, states: Sequence[FakeStepState]) -> None:
        self.steps.append([s.item.seed for s in states])
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail is not None:
            self.fail([s.item for s in states])
        for state in states:
            state.remaining -= 1

    def finish(self, states: Sequence[FakeStepState]) -> list[Image.Image]:
        return [Image.new("RGB", (s.item.width, s.item.height), (s.item.seed % 256, 0, 0))
                for s in states]
