"""Issue 21, the sim part: 16 tenants each on their own LoRA, open loop at 60% of the batch-8
capacity, on the simulated GPU. Two servers receive the same Poisson schedule at once: one
batching requests with different LoRAs together (`--lora-batching mixed`, per-row adapters) and
one keying batches by LoRA set (`split`, what engines without per-row LoRA do). Reports p50,
p95, mean batch size and images/s of each, and the p50 ratio.

    PYTHONPATH=src:. python -m benchmarks.lora_sim --out benchmarks/results/lora/sim.json

The sim replays step costs (`--step-ms` + n x `--step-per-image-ms` per step of n images); per-row
adapters add nothing there (on a GPU they cost a few percent of a step), so the comparison is
batching alone.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.openloop import capacity, figures, fire, schedule
from benchmarks.report import emit_json
from benchmarks.serve import batchserve_cmd, server


def bodies(n: int, adapters: int, size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    return [{"prompt": f"tenant request {i}", "seed": i, "width": size, "height": size,
             "inference_steps": 20, "guidance_scale": 7.5,
             "loras": [{"name": f"tenant-{rng.randrange(adapters)}", "scale": 0.8}]}
            for i in range(n)]


async def run(urls: dict[str, str], payloads: list[dict[str, Any]], times: list[float],
              timeout_s: float) -> list[list[dict[str, Any]]]:
    return list(await asyncio.gather(*(fire(u, payloads, times, timeout_s)
                                       for u in urls.values())))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--load", type=float, default=0.6)
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--step-per-image-ms", type=float, default=15.0)
    p.add_argument("--duration-s", type=float, default=60.0)
    p.add_argument("--max-requests", type=int, default=400)
    p.add_argument("--warm-s", type=float, default=5.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--policy", default="continuous", choices=("deadline", "continuous"))
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--out", type=Path, default=None)
    opts = p.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-lora-sim-"))
    for i in range(opts.adapters):  # names only: the sim applies no weights
        (folder / f"tenant-{i}.safetensors").write_bytes(b"")
    rate = opts.load * capacity("one-key", opts.step_ms, opts.step_per_image_ms)
    times = schedule(rate, opts.max_requests, opts.duration_s, opts.seed)
    payloads = bodies(len(times), opts.adapters, opts.size, opts.seed)
    common = ["--model", "sim", "--sim-step-ms", str(opts.step_ms), "--sim-step-per-image-ms",
              str(opts.step_per_image_ms), "--flush-policy", opts.policy, "--max-batch-size",
              "8", "--max-queue", "1024", "--warmup", "", "--lora-dir", str(folder)]
    out: dict[str, Any] = {"adapters": opts.adapters, "load": opts.load, "rate_per_s": rate,
                           "policy": opts.policy, "requests": len(times),
                           "step_ms": opts.step_ms, "step_per_image_ms": opts.step_per_image_ms}
    with server(batchserve_cmd([*common, "--lora-batching", "mixed"]),
                folder / "mixed.log") as mixed, \
            server(batchserve_cmd([*common, "--lora-batching", "split"]),
                   folder / "split.log") as split:
        urls = {"mixed": mixed, "split": split}
        runs = asyncio.run(run(urls, payloads, times, 120.0))
    for name, records in zip(urls, runs, strict=True):
        fig = figures(records, opts.warm_s)
        fig.pop("lat_ms")
        out[name] = fig
    out["p50_mixed_over_split"] = (out["mixed"]["p50_ms"] / out["split"]["p50_ms"]
                                   if out["split"]["p50_ms"] else None)
    emit_json(out, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
