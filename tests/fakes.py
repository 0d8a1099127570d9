"""A fake engine whose batches are held behind events, so tests decide when a batch ends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

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
