"""The raw pipeline in-process: the engine's own `generate` at fixed batch sizes, no server.

    python -m benchmarks.raw --model tiny --size 256x256x20 --batch-sizes 1,8 --repeats 3

Prints one JSON object: per batch size the seconds of each timed repeat, the median and the
images per second it gives. This is the limit a server on the same machine can approach.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from batchserve.engines import GenerationItem, load_engine
from batchserve.settings import Settings

PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def measure(settings: Settings, size: tuple[int, int, int], batch_sizes: Sequence[int],
            repeats: int) -> dict[str, Any]:
    started = time.perf_counter()
    engine = load_engine(settings)
    load_s = time.perf_counter() - started
    width, height, steps = size
    runs: dict[str, Any] = {}
    for n in batch_sizes:
        items = [GenerationItem(PROMPT, "", seed, width, height, steps, 7.5) for seed in range(n)]
        engine.generate(items)  # first call at a shape allocates; never timed
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            images = engine.generate(items)
            times.append(time.perf_counter() - t)
            assert len(images) == n
        median = statistics.median(times)
        runs[str(n)] = {"seconds": [round(s, 4) for s in times], "median_s": round(median, 4),
                        "images_per_s": round(n / median, 4)}
    return {"model": settings.model, "device": engine.info().device,
            "size": f"{width}x{height}x{steps}", "load_s": round(load_s, 2), "batches": runs}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--size", default="256x256x20", help="WxHxSTEPS")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--repeats", type=int, default=3)
    opts = p.parse_args(argv)
    w, h, steps = (int(n) for n in opts.size.split("x"))
    settings = Settings(model=opts.model, device=opts.device, dtype=opts.dtype, warmup="")
    sizes = [int(n) for n in opts.batch_sizes.split(",")]
    json.dump(measure(settings, (w, h, steps), sizes, opts.repeats), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
