"""`python -m benchmarks`: one run that shows what batching buys on this machine.

1. raw: the engine in-process at batch 1 and at the max batch size (the limit);
2. served: the real model behind the server, unbatched (`--max-batch-size 1`), batched with the
   default deadline policy, and batched with the `eager` policy, under the same closed-loop
   Locust load at several user counts;
3. overhead: the null engine (`--model sim`, 0 ms) against a bare Starlette endpoint;
4. sim-gpu: `--model sim` replaying published GPU timings (a + b*n ms per batch of n), to show
   how the scheduler behaves on a GPU this machine lacks;
5. goodput: impatient clients (closed loop, giving up before a full batch ends) against
   unbatched, today's batching and the adaptive scheduler; then patient clients against
   batching with the adaptive scheduler off and on (`benchmarks/goodput.py`);
6. jobs: the same sim engine behind `/t2i` and behind async jobs (memory queue, Redis queue):
   images/s at saturation and the latency one user sees, polling included.

Results go to --out (JSON, CSV, a markdown table, PNG charts); the table is also printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import goodput, report
from benchmarks.serve import (
    ROOT,
    Load,
    bare_cmd,
    batchserve_cmd,
    redis_server,
    run_locust,
    server,
    summarize,
)


@dataclass(frozen=True)
class Arm:
    name: str
    args: tuple[str, ...]


def arms(max_batch: int, max_wait_ms: float) -> list[Arm]:
    batched = ("--max-batch-size", str(max_batch), "--max-wait-ms", str(max_wait_ms))
    return [
        Arm("unbatched", ("--max-batch-size", "1")),
        Arm("batched", (*batched, "--flush-policy", "deadline")),
        Arm("eager", (*batched, "--flush-policy", "eager")),
    ]


def parse_size(text: str) -> tuple[int, int, int]:
    w, h, steps = (int(n) for n in text.split("x"))
    return w, h, steps


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (CPU), sd15 or a checkpoint (GPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", default="256x256x20", help="WxHxSTEPS of every request")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=500.0)
    p.add_argument("--users", default="1,4,8,16", help="user counts for the served curves")
    p.add_argument("--duration-s", type=float, default=60.0, help="Locust time per point")
    p.add_argument("--warm-s", type=float, default=12.0,
                   help="requests started this soon after the first are not measured")
    p.add_argument("--repeats", type=int, default=3, help="timed raw batches per size")
    p.add_argument("--sim-base-ms", type=float, default=500.0,
                   help="sim-gpu: fixed ms per batch (SD 1.x, 512², 20 steps, A100)")
    p.add_argument("--sim-per-image-ms", type=float, default=300.0,
                   help="sim-gpu: ms per image in a batch")
    p.add_argument("--sim-users", default="1,8,32")
    p.add_argument("--sim-duration-s", type=float, default=25.0)
    p.add_argument("--overhead-users", type=int, default=32)
    p.add_argument("--overhead-duration-s", type=float, default=15.0)
    goodput.add_options(p)
    p.add_argument("--jobs-users", type=int, default=32,
                   help="jobs: users at saturation (each submits, polls, fetches, repeats)")
    p.add_argument("--jobs-duration-s", type=float, default=20.0)
    p.add_argument("--jobs-sim-base-ms", type=float, default=100.0,
                   help="jobs: sim engine fixed ms per batch")
    p.add_argument("--jobs-sim-per-image-ms", type=float, default=20.0)
    p.add_argument("--only", default="raw,served,overhead,sim-gpu,goodput",
                   help="comma-separated parts to run (also: jobs)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of every part in about a minute (tiny 64x64x2, short loads)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.size, opts.users, opts.duration_s, opts.warm_s = "64x64x2", "2", 4.0, 0.5
        opts.repeats, opts.max_batch_size, opts.max_wait_ms = 1, 2, 100.0
        opts.sim_users, opts.sim_duration_s, opts.sim_base_ms = "4", 3.0, 50.0
        opts.sim_per_image_ms, opts.overhead_users, opts.overhead_duration_s = 20.0, 8, 3.0
        goodput.quick(opts)
        opts.jobs_users, opts.jobs_duration_s = 8, 4.0
    return opts


def run_raw(opts: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.raw", "--model", opts.model, "--device",
           opts.device, "--size", opts.size, "--batch-sizes", f"1,{opts.max_batch_size}",
           "--repeats", str(opts.repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_curves(opts: argparse.Namespace, workdir: Path, part: str, model_args: list[str],
               users: list[int], duration_s: float, warm_s: float) -> list[dict[str, Any]]:
    points = []
    size = parse_size(opts.size)
    for arm in arms(opts.max_batch_size, opts.max_wait_ms):
        if opts.quick and part == "sim-gpu" and arm.name != "batched":
            continue
        cmd = batchserve_cmd([*model_args, *arm.args])
        with server(cmd, workdir / f"{part}-{arm.name}.server.log") as url:
            for n in users:
                scenario = "single_user" if n == 1 else "saturate"
                load = Load(scenario, n, duration_s, warm_s, size)
                name = f"{part}-{arm.name}-u{n}"
                print(f"  {name}: {scenario}, {n} users, {duration_s:g} s", flush=True)
                figures = summarize(run_locust(url, load, workdir, name), load)
                points.append({"part": part, "arm": arm.name, "users": n, **figures})
    return points


def run_overhead(opts: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    load = Load("saturate", opts.overhead_users, opts.overhead_duration_s,
                min(2.0, opts.overhead_duration_s / 4), (64, 64, 1))
    null = ["--model", "sim", "--sim-base-ms", "0", "--sim-per-image-ms", "0", "--warmup", ""]
    targets = [
        ("bare", bare_cmd()),
        ("bare-encoding", bare_cmd("encoding_app")),
        ("null", batchserve_cmd([*null, "--max-batch-size", str(opts.max_batch_size)])),
    ]
    points = []
    for name, cmd in targets:
        with server(cmd, workdir / f"overhead-{name}.server.log") as url:
            print(f"  overhead-{name}: {load.users} users, {load.duration_s:g} s", flush=True)
            records = run_locust(url, load, workdir, f"overhead-{name}")
        figures = summarize(records, load)
        points.append({"part": "overhead", "arm": name, "users": load.users, **figures})
    return points


JOB_ARMS = (("t2i", ()), ("jobs-memory", ()), ("jobs-redis", ("--queue", "{redis}")))


def run_jobs(opts: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """One sim engine behind `/t2i`, then behind jobs on the memory queue, then on Redis
    (`--role all`, results in memory): one user, then `--jobs-users` users."""
    sim = ["--model", "sim", "--sim-base-ms", str(opts.jobs_sim_base_ms), "--sim-per-image-ms",
           str(opts.jobs_sim_per_image_ms), "--max-batch-size", str(opts.max_batch_size),
           "--max-wait-ms", str(opts.max_wait_ms), "--warmup", ""]
    points = []
    with redis_server(workdir) as redis_url:
        for arm, extra in JOB_ARMS:
            args = [a.format(redis=redis_url) for a in extra]
            with server(batchserve_cmd([*sim, *args]), workdir / f"jobs-{arm}.server.log") as url:
                for n in (1, opts.jobs_users):
                    scenario = "jobs" if arm != "t2i" else "single_user" if n == 1 else "saturate"
                    load = Load(scenario, n, opts.jobs_duration_s,
                                min(2.0, opts.jobs_duration_s / 4), (64, 64, 1))
                    name = f"jobs-{arm}-u{n}"
                    print(f"  {name}: {scenario}, {n} users, {load.duration_s:g} s", flush=True)
                    figures = summarize(run_locust(url, load, workdir, name), load)
                    points.append({"part": "jobs", "arm": arm, "users": n, **figures})
    return points


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    parts = set(opts.only.split(","))
    out: Path = opts.out
    workdir = out / "runs"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "cpus": _cpus()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "points": [],
    }
    if "raw" in parts:
        print("raw pipeline", flush=True)
        results["raw"] = run_raw(opts)
    model_args = ["--model", opts.model, "--device", opts.device,
                  "--warmup", opts.size]
    if "served" in parts:
        print(f"served ({opts.model})", flush=True)
        results["points"] += run_curves(opts, workdir, "served", model_args,
                                        _ints(opts.users), opts.duration_s, opts.warm_s)
    if "raw" in parts and "served" in parts and not opts.quick:
        print("raw pipeline again (the machine's speed can drift over a long run)", flush=True)
        results["raw_after"] = run_raw(opts)
    if "overhead" in parts:
        print("serving overhead", flush=True)
        results["points"] += run_overhead(opts, workdir)
    if "sim-gpu" in parts:
        print("sim-gpu", flush=True)
        sim = ["--model", "sim", "--sim-base-ms", str(opts.sim_base_ms),
               "--sim-per-image-ms", str(opts.sim_per_image_ms), "--warmup", ""]
        results["points"] += run_curves(opts, workdir, "sim-gpu", sim, _ints(opts.sim_users),
                                        opts.sim_duration_s, min(opts.warm_s,
                                                                 opts.sim_duration_s / 4))
    if "goodput" in parts:
        print("goodput (sim engine)", flush=True)
        results["points"] += goodput.run(opts, workdir)
    if "jobs" in parts:
        print("jobs (sim engine: /t2i vs async jobs)", flush=True)
        results["points"] += run_jobs(opts, workdir)
    results["elapsed_s"] = round(time.time() - started, 1)
    results["targets"] = report.targets(results)
    table = report.write(results, out)
    print(table)
    failures = sum(p.get("failures", 0) for p in results["points"] if p["part"] != "goodput")
    return 1 if failures else 0


def _ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
