"""A fake engine whose batches are held behind events, so tests decide when a batch ends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from batchserve.engines import EngineInfo, GenerationItem, StopCheck
from batchserve.errors import Interrupted


class Steps:
    """Hands out denoising steps one at a time: the engine thread blocks before each step until
    the test `allow`s it, and `reached(n)` waits until `n` steps have started."""

    def __init__(self) -> None:
        self._allowed = threading.Semaphore(0)
        self._cond = threading.Condition()
        self.started = 0

    def allow(self, n: int = 1) -> None:
        self._allowed.release(n)

    def __call__(self, step: int) -> None:
        with self._cond:
            self.started += 1
            self._cond.notify_all()
        self._allowed.acquire(timeout=30)

    def reached(self, n: int, timeout_s: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.started >= n, timeout_s)


class FakeEngine:
    """Records every batch; `gate` (when set) blocks `generate` until the test opens it.

    `fail` may raise for a given batch to inject faults. `on_step` is called before each
    denoising step (`Steps` holds it); after each step `should_stop` is polled, as the
    diffusers engine does from its step-end callback, and `Interrupted` raised when true.
    """

    def __init__(
        self,
        *,
        gate: threading.Event | None = None,
        fail: Callable[[Sequence[GenerationItem]], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        warmup_timings: dict[tuple[int, int, int, float], float] | None = None,
    ) -> None:
        self.gate = gate
        self.fail = fail
        self.on_step = on_step
        self.warmup_timings = warmup_timings
        self.batches: list[list[GenerationItem]] = []
        self.steps_run = 0
        self.interrupted = 0
        self.started = threading.Event()
        self.warmed = False

    def info(self) -> EngineInfo:
        return EngineInfo("fake", "cpu", "fp32", "none", "none")

    def warmup(self) -> dict[tuple[int, int, int, float], float] | None:
        self.warmed = True
        return self.warmup_timings

    def generate(
        self, items: Sequence[GenerationItem], should_stop: StopCheck | None = None
    ) -> list[Image.Image]:
        self.batches.append(list(items))
        self.started.set()
        if self.gate is not None:
            self.gate.wait(timeout=30)
        for step in range(items[0].inference_steps):
            if self.on_step is not None:
                self.on_step(step)
            self.steps_run += 1
            if should_stop is not None and should_stop():
                self.interrupted += 1
                raise Interrupted(f"stopped after step {step + 1}")
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
