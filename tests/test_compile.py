"""GPU tuning switches that have a CPU form, run for real on the CPU: channels-last, and
torch.compile of the tiny UNet with the mode and fullgraph setting used on CUDA (inductor's C++
backend), checked against eager images and for recompilation after the server is ready."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
import pytest
import torch

from batchserve.engines import GenerationItem
from batchserve.engines.diffusion import COMPILE_MODE, DiffusionEngine, plan_tuning
from batchserve.service import Service
from batchserve.settings import Settings

ITEMS = [GenerationItem("a red cube on a table", "blurry", seed, 64, 64, 1, 7.5)
         for seed in (11, 12)]


def differ(a: list[Any], b: list[Any]) -> int:
    """The largest per-pixel difference between two lists of images (uint8 steps)."""
    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max())
               for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def eager() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup=""))


def test_compile_and_channels_last_are_honoured_on_cpu_when_asked() -> None:
    plan = plan_tuning(Settings(compile=True, channels_last_cpu=True, max_batch_size=4),
                       cuda=False, xformers=False)
    switches = {s.name: s for s in plan.switches}
    assert switches["torch_compile"].enabled and COMPILE_MODE in switches["torch_compile"].detail
    assert switches["channels_last"].enabled
    assert "batch sizes 1, 4" in switches["warmup"].detail  # compiled: two sizes go dynamic
    default = {s.name: s for s in plan_tuning(Settings(), cuda=False, xformers=False).switches}
    assert not default["torch_compile"].enabled and not default["channels_last"].enabled
    assert "batch sizes 1" in default["warmup"].detail  # CPU start stays quick


def test_channels_last_on_cpu_is_applied_and_matches_eager(eager: DiffusionEngine) -> None:
    engine = DiffusionEngine.load(Settings(model="tiny", warmup="", channels_last_cpu=True))
    for module in (engine.pipe.unet, engine.pipe.vae):
        weight = next(p for p in module.parameters() if p.dim() == 4)
        assert weight.is_contiguous(memory_format=torch.channels_last)
    assert differ(engine.generate(ITEMS), eager.generate(ITEMS)) <= 1


def _slow_selected(config: pytest.Config) -> bool:
    return "slow" in (config.getoption("markexpr") or "") or bool(
        os.environ.get("BATCHSERVE_COMPILE_TEST"))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_unet_matches_eager_and_never_recompiles_after_ready(
    eager: DiffusionEngine, request: pytest.FixtureRequest
) -> None:
    """Slow: compiling the tiny UNet twice (static, then dynamic in the batch) took 259 s from
    a cold inductor cache on our shared 2-core machine, 13 s from a warm one (see
    docs/guides/operating.md, Warm-up)."""
    if not _slow_selected(request.config):
        pytest.skip("compiles for minutes from a cold cache: run with `-m slow` or "
                    "BATCHSERVE_COMPILE_TEST=1")
    from torch._dynamo.utils import counters

    settings = Settings(model="tiny", compile=True, channels_last_cpu=True, warmup="64x64x1",
                        max_batch_size=2)
    engine = DiffusionEngine.load(settings)
    assert isinstance(engine.pipe.unet, torch._dynamo.eval_frame.OptimizedModule)

    async def serve() -> tuple[dict[str, int], dict[str, int], list[Any]]:
        service = Service(settings, engine_factory=lambda _: engine)
        await service.start()
        try:
            assert await service.wait_loaded() == Service.READY  # warmed at sizes 1 and 2
            before = dict(counters["stats"])
            images = [*await service.worker.run(lambda: engine.generate(ITEMS[:1])),
                      *await service.worker.run(lambda: engine.generate(ITEMS))]
            return before, dict(counters["stats"]), images
        finally:
            await service.stop()

    before, after, images = asyncio.run(serve())
    assert before["unique_graphs"] >= 1
    assert after == before  # no graph compiled after ready, for either warmed size
    expected = eager.generate(ITEMS[:1]) + eager.generate(ITEMS)
    assert differ(images, expected) <= 1
