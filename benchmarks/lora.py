"""Issue 21's benchmark: what mixed-LoRA batches keep of batching, on the engine itself (CPU).

Eight requests, each with its own LoRA, run as ONE mixed batch against the same eight split by
adapter (eight batches of one, what engines that key batches by LoRA do). The engine's own
batch-8 gain without LoRA, measured in the same run, is the yardstick: the mixed batch should
keep >= 80% of it. Then the mixed batch against eight requests without LoRA, per rank: the
price of per-row adapters. Adapters are resident before timing (the cache's cold read is its
own figure, `load_ms`). Each arm is timed `--repeats` times; the median counts.

    PYTHONPATH=src:tests:. python -m benchmarks.lora --out benchmarks/results/lora

The model is `tiny` (random weights) at `--size`: its layers are small, so the per-row Python
work weighs more than it would on SD 1.5 — a pessimistic case for the overhead ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchserve.engines import GenerationItem, LoraPick
from batchserve.engines import tiny as tiny_preset
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.engines.lora import LoraLibrary
from batchserve.settings import Settings
from benchmarks.report import emit_json
from benchmarks.serve import median_s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="128x128x8", help="WIDTHxHEIGHTxSTEPS")
    p.add_argument("--ranks", default="4,16,64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None)
    opts = p.parse_args(argv)
    from loras import kohya  # type: ignore[import-not-found]  # tests/loras.py (on the path)

    w, h, steps = (int(x) for x in opts.size.split("x"))
    ranks = [int(r) for r in opts.ranks.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    pipe = tiny_preset.build_pipeline()
    for rank in ranks:
        for i in range(opts.batch):
            kohya(folder / f"r{rank}-{i}.safetensors", pipe, seed=rank * 100 + i, rank=rank)
    engine = DiffusionEngine.load(Settings(model="tiny", warmup="", lora_dir=str(folder)))
    engine.use_loras(LoraLibrary(folder))
    runtime = engine.lora
    assert runtime is not None
    base = GenerationItem("a lighthouse at dusk, oil painting", "blurry", 0, w, h, steps, 7.5,
                          engine.sampler)
    plain = [replace(base, seed=i) for i in range(opts.batch)]
    engine.generate(plain[:2])  # first-call costs out of the way

    def alone(items: list[GenerationItem]) -> Callable[[], None]:
        def run() -> None:
            for item in items:
                engine.generate([item])
        return run

    def together(items: list[GenerationItem]) -> Callable[[], None]:
        def run() -> None:
            engine.generate(items)
        return run

    out: dict[str, Any] = {"model": "tiny", "size": opts.size, "batch": opts.batch,
                           "repeats": opts.repeats}
    plain_split = median_s(alone(plain), opts.repeats)
    plain_batch = median_s(together(plain), opts.repeats)
    out["engine_batch_gain"] = plain_split / plain_batch
    out["plain_batch_s"], out["plain_split_s"] = plain_batch, plain_split
    out["ranks"] = {}
    for rank in ranks:
        mixed = [replace(item, loras=(LoraPick(f"r{rank}-{i}", 0.8),))
                 for i, item in enumerate(plain)]
        started = time.perf_counter()
        runtime.choices(mixed)  # read every adapter once: the cold cache's cost
        load_ms = (time.perf_counter() - started) * 1000 / len(mixed)
        mixed_split = median_s(alone(mixed), opts.repeats)
        mixed_batch = median_s(together(mixed), opts.repeats)
        gain = mixed_split / mixed_batch
        out["ranks"][str(rank)] = {
            "mixed_batch_s": mixed_batch, "split_by_adapter_s": mixed_split,
            "mixed_gain": gain, "kept_of_engine_gain": gain / out["engine_batch_gain"],
            "overhead_vs_no_lora": mixed_batch / plain_batch, "load_ms_per_adapter": load_ms,
        }
    emit_json(out, None if opts.out is None else opts.out / f"lora-{opts.size}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
