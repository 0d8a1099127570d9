"""`python -m benchmarks.openloop`: the three flush policies under open-loop Poisson arrivals.

Arrivals never wait for completions (Locust is closed-loop: its users wait for their answer, so
a slow server also slows its own load). Here each request is sent at its scheduled time by its
own asyncio task over httpx, from one seeded Poisson schedule that every policy receives
identically. Traffic goes to 127.0.0.1 only; each point is bounded by a request count and a
duration.

One run: for each traffic mix ((a) one key; (b) steps 20/30 and guidance 7/7.5, one size) and
each load (a fraction of the engine's batch-8 capacity), the same schedule is fired at three
servers at once, `deadline`, `eager` and `continuous`, all `--model sim` replaying a GPU's step
cost (`--sim-step-ms` + n x `--sim-step-per-image-ms` per step of n items). The two mixes run at
the same time too, each on its own three servers: the sim engine sleeps rather than computes, so
six servers barely load the CPU. `--model tiny` runs the real tiny model on CPU instead (then
one server works at a time, one mix after the other: they would share the CPU).

A point's percentiles need many requests: with ~80 (60 s at 60%) the ideal model's own ratio
moves by +-0.15 between seeds (`python -m benchmarks.ideal --requests 80 --runs 40`), so the
defaults send up to 1000 requests a point, and the report gives each ratio a block-bootstrap
interval (`openloop_report`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import io
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serve import ROOT, batchserve_cmd, percentile, server

POLICIES = ("deadline", "eager", "continuous")
CPU_MODELS = ("tiny", "tiny-sdxl")
"""Presets that compute on this CPU (one server works at a time)."""
MIXES: dict[str, list[tuple[int, float]]] = {  # (steps, guidance), drawn uniformly
    "one-key": [(20, 7.5)],
    "mixed": [(20, 7.0), (20, 7.5), (30, 7.0), (30, 7.5)],
    "img2img": [(20, 7.5)],
}
IMAGE_MIXES: dict[str, tuple[float, float, float]] = {"img2img": (0.5, 0.3, 0.9)}
"""Mixes with image requests: (share of img2img requests, lowest and highest strength, drawn
uniformly). An img2img request runs `int(steps * strength)` steps from a later start step: the
whole-batch policies batch it only with requests of its start step, `continuous` with all."""


def steps_run(body: dict[str, Any]) -> int:
    """The denoising steps a request runs: all of them, or an img2img request's last
    `int(steps * strength)` (`ImageInput.start_step`)."""
    steps = int(body["inference_steps"])
    if "strength" not in body:
        return steps
    return min(int(steps * float(body["strength"])), steps)


def _mean_steps(mix: str) -> float:
    steps = sum(s for s, _ in MIXES[mix]) / len(MIXES[mix])
    if mix not in IMAGE_MIXES:
        return steps
    share, low, high = IMAGE_MIXES[mix]
    grid = [low + (high - low) * i / 1000 for i in range(1001)]
    image_steps = sum(min(int(steps * s), steps) for s in grid) / len(grid)
    return (1 - share) * steps + share * image_steps


def ideal_keys(mix: str) -> list[tuple[int, float]]:
    """The mix as `benchmarks.ideal` draws it, uniformly from this list: (steps run, guidance),
    which for image mixes (all at the same steps) is also the whole-batch key."""
    if mix not in IMAGE_MIXES:
        return MIXES[mix]
    share, low, high = IMAGE_MIXES[mix]
    grid = [low + (high - low) * i / 100 for i in range(101)]
    text = [(steps, guidance) for steps, guidance in MIXES[mix]]
    image = [(min(int(steps * s), steps), guidance) for steps, guidance in text for s in grid]
    return text * round(len(image) * (1 - share) / share / len(text)) + image


@functools.lru_cache(maxsize=4)
def init_image(size: int) -> str:
    """The img2img requests' init image, base64 PNG: flat colours, so it is small on the wire
    and `sim`, which hands it back, encodes it fast."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (size, size), (90, 150, 210))
    ImageDraw.Draw(picture).rectangle((0, size * 2 // 3, size, size), fill=(60, 140, 60))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


@dataclass(frozen=True)
class Point:
    mix: str
    load: float  # fraction of batch-8 capacity
    rate: float  # requests per second offered


def capacity(mix: str, step_ms: float, per_image_ms: float, batch: int = 8) -> float:
    """Images per second of full batches of `batch` at the mix's mean step count (steps run:
    an img2img request runs fewer)."""
    steps = _mean_steps(mix)
    return batch / (steps * (step_ms + batch * per_image_ms) / 1000.0)


def schedule(rate: float, count: int, duration_s: float, seed: int) -> list[float]:
    """Poisson arrival offsets (exponential gaps) in seconds: at most `count`, within
    `duration_s`."""
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0
    while len(times) < count:
        t += rng.expovariate(rate)
        if t > duration_s:
            break
        times.append(t)
    return times


def bodies(mix: str, n: int, size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed + 1)
    out = []
    for i in range(n):
        steps, guidance = rng.choice(MIXES[mix])
        body: dict[str, Any] = {"prompt": f"open loop {i}", "seed": i, "width": size,
                                "height": size, "inference_steps": steps,
                                "guidance_scale": guidance}
        if mix in IMAGE_MIXES:  # draws only for image mixes: the others' bodies stay as they were
            share, low, high = IMAGE_MIXES[mix]
            if rng.random() < share:
                body.update(init_image=init_image(size), strength=round(rng.uniform(low, high), 2))
        out.append(body)
    return out


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], at: float,
               t0: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    start = time.perf_counter()
    try:
        resp = await client.post(url + "/t2i", json=body)
        status, headers = resp.status_code, resp.headers
    except httpx.HTTPError as exc:
        status, headers = 0, httpx.Headers({"x-error": type(exc).__name__})
    end = time.perf_counter()
    return {"start": start - t0, "end": end - t0, "status": status, "ok": status == 200,
            "steps": steps_run(body),
            "batch_size": int(headers.get("x-batch-size", 0)),
            "queue_ms": float(headers.get("x-queue-ms", 0)),
            "inference_ms": float(headers.get("x-inference-ms", 0))}


async def fire(url: str, payloads: Sequence[dict[str, Any]], times: Sequence[float],
               timeout_s: float) -> list[dict[str, Any]]:
    """Sends payloads[i] at times[i] after now, whatever is still outstanding."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(
            _one(client, url, b, at, t0) for b, at in zip(payloads, times, strict=False))))


def figures(records: Sequence[dict[str, Any]], warm_s: float) -> dict[str, Any]:
    """A policy's figures at one point; `lat_ms` keeps each request's latency by its index in
    the schedule (None: in the warm-up or failed), so the report can pair the policies."""
    measured = [r for r in records if r["start"] >= warm_s]
    ok = [r for r in measured if r["ok"]]
    lat = [(r["end"] - r["start"]) * 1000 for r in ok]
    done = [r for r in records if r["ok"]]
    span = (max(r["end"] for r in done) - min(r["start"] for r in records)) if done else 0.0
    return {
        "requests": len(records), "failures": sum(not r["ok"] for r in records),
        "measured": len(ok),
        "p50_ms": round(percentile(lat, 0.5), 1), "p95_ms": round(percentile(lat, 0.95), 1),
        "images_per_s": round(len(done) / span, 3) if span > 0 else 0.0,
        "mean_batch_size": round(sum(r["batch_size"] for r in ok) / len(ok), 2) if ok else 0.0,
        "lat_ms": [round((r["end"] - r["start"]) * 1000, 1) if r["ok"] and r["start"] >= warm_s
                   else None for r in records],
    }


def server_args(opts: argparse.Namespace, policy: str) -> list[str]:
    args = ["--flush-policy", policy, "--max-batch-size", "8", "--max-wait-ms",
            str(opts.max_wait_ms), "--max-queue", "1024", "--warmup", ""]
    if opts.model == "sim":
        return ["--model", "sim", "--sim-step-ms", str(opts.step_ms),
                "--sim-step-per-image-ms", str(opts.step_per_image_ms), *args]
    return ["--model", opts.model, *args]


def requests(point: Point, max_requests: int, duration_s: float, size: int, seed: int
             ) -> tuple[list[float], list[dict[str, Any]]]:
    """A point's send times and bodies: what every policy receives, and what the report's
    ideal model replays."""
    times = schedule(point.rate, max_requests, duration_s, seed)
    return times, bodies(point.mix, len(times), size, seed)


async def run_point(urls: dict[str, str], point: Point, opts: argparse.Namespace
                    ) -> dict[str, dict[str, Any]]:
    times, payloads = requests(point, opts.max_requests, opts.duration_s, opts.size, opts.seed)
    if opts.model == "sim":  # the GPU is simulated: the three servers can share the CPU
        runs = await asyncio.gather(*(fire(u, payloads, times, opts.timeout_s)
                                      for u in urls.values()))
    else:
        runs = [await fire(u, payloads, times, opts.timeout_s) for u in urls.values()]
    return {policy: figures(recs, opts.warm_s) for policy, recs in zip(urls, runs, strict=True)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.openloop", description=__doc__)
    p.add_argument("--model", choices=("sim", *CPU_MODELS), default="sim")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help="comma-separated, of " + ", ".join(POLICIES))
    p.add_argument("--step-ms", type=float, default=25.0, help="sim: fixed ms per UNet step")
    p.add_argument("--step-per-image-ms", type=float, default=15.0,
                   help="sim: ms per image per step")
    p.add_argument("--cpu-step-ms", type=float, default=0.0,
                   help="tiny: ms per step (fixed part), to size the loads; with "
                        "--cpu-step-per-image-ms 0 both are measured first")
    p.add_argument("--cpu-step-per-image-ms", type=float, default=0.0,
                   help="tiny: ms per image per step, to size the loads (0: measured)")
    p.add_argument("--loads", default="0.3,0.6,0.9,1.2")
    p.add_argument("--mixes", default=None,
                   help=f"comma-separated, of {', '.join(MIXES)} (default: one-key,mixed)")
    p.add_argument("--duration-s", type=float, default=900.0, help="at most, per point")
    p.add_argument("--max-requests", type=int, default=1000, help="at most, per point")
    p.add_argument("--warm-s", type=float, default=8.0)
    p.add_argument("--max-wait-ms", type=float, default=500.0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "continuous")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.step_ms, opts.step_per_image_ms, opts.loads = 2.0, 1.0, "0.6"
        opts.mixes = opts.mixes or "mixed"
        opts.duration_s, opts.max_requests, opts.warm_s, opts.size = 2.0, 30, 0.0, 64
        opts.max_wait_ms = 50.0
    opts.mixes = opts.mixes or "one-key,mixed"
    unknown = set(opts.mixes.split(",")) - set(MIXES)
    if unknown:
        p.error(f"--mixes: unknown {', '.join(sorted(unknown))}; one of {', '.join(MIXES)}")
    opts.policies = tuple(opts.policies.split(","))
    if set(opts.policies) - set(POLICIES):
        p.error(f"--policies: each one of {', '.join(POLICIES)}")
    return opts


async def run_mix(urls: dict[str, str], points: Sequence[Point], opts: argparse.Namespace
                  ) -> list[dict[str, Any]]:
    """One mix's points, one after another, on its own servers."""
    results = []
    for point in points:
        started = time.perf_counter()
        by_policy = await run_point(urls, point, opts)
        results.append({"mix": point.mix, "load": point.load, "rate": round(point.rate, 3),
                        "policies": by_policy})
        line = "  ".join(f"{k}: p50 {v['p50_ms']:.0f} p95 {v['p95_ms']:.0f} "
                         f"{v['images_per_s']:.2f}/s" for k, v in by_policy.items())
        print(f"{point.mix:8s} {point.load:.0%} ({point.rate:.2f}/s, "
              f"{time.perf_counter() - started:.0f} s)  {line}", flush=True)
    return results


def calibrate(size: int, steps: int = 20, model: str = "tiny") -> tuple[float, float]:
    """A CPU preset's step cost on this CPU, (fixed ms, ms per image) per step, from its raw
    pipeline at batch 1 and 8 (`benchmarks.raw`): what the loads are fractions of."""
    from batchserve.settings import Settings
    from benchmarks.raw import measure

    runs = measure(Settings(model=model, warmup=""), (size, size, steps), [1, 8],
                   repeats=3)["batches"]
    one, eight = (runs[n]["median_s"] * 1000 / steps for n in ("1", "8"))
    per_image = max(0.0, (eight - one) / 7)
    return max(0.0, one - per_image), per_image


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    logs = opts.out / "runs"  # server logs, not committed
    logs.mkdir(parents=True, exist_ok=True)
    if opts.model in CPU_MODELS and not opts.cpu_step_per_image_ms:
        opts.cpu_step_ms, opts.cpu_step_per_image_ms = calibrate(opts.size, model=opts.model)
        print(f"{opts.model} on this CPU: {opts.cpu_step_ms:.2f} ms + "
              f"{opts.cpu_step_per_image_ms:.2f} ms per image per step "
              "(raw pipeline, batch 1 and 8)", flush=True)
    step_ms, per_image_ms = ((opts.step_ms, opts.step_per_image_ms) if opts.model == "sim"
                             else (opts.cpu_step_ms, opts.cpu_step_per_image_ms))
    mixes = opts.mixes.split(",")
    points = {mix: [Point(mix, load, load * capacity(mix, step_ms, per_image_ms))
                    for load in map(float, opts.loads.split(","))] for mix in mixes}
    with contextlib.ExitStack() as stack:
        if opts.model == "sim":  # every mix at once, each on its own three servers
            urls = {mix: {policy: stack.enter_context(server(
                batchserve_cmd(server_args(opts, policy)), logs / f"{mix}-{policy}.log"))
                for policy in opts.policies} for mix in mixes}
            runs = await asyncio.gather(*(run_mix(urls[mix], points[mix], opts)
                                          for mix in mixes))
        else:  # the CPU is the engine: one mix after the other on the same three servers
            shared = {policy: stack.enter_context(server(
                batchserve_cmd(server_args(opts, policy)), logs / f"{policy}.log"))
                for policy in opts.policies}
            runs = [await run_mix(shared, points[mix], opts) for mix in mixes]
    out = {"settings": {k: str(v) for k, v in vars(opts).items()},
           "points": [point for run in runs for point in run]}
    (opts.out / "openloop.json").write_text(json.dumps(out, indent=1))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    out = asyncio.run(main_async(opts))
    from benchmarks import openloop_report

    openloop_report.write(out, opts.out)


if __name__ == "__main__":
    main()
