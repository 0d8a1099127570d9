"""The runner's `goodput` part: impatient clients against three servers, in one run.

Closed-loop users give up after `--goodput-timeout-s` (shorter than one full batch, longer than
a batch of one) and send their next request at once. Three servers on the same engine:
unbatched (`--max-batch-size 1`), today's batching (`--adaptive-batch off`) and the adaptive
scheduler; the adaptive one twice, with clients that do not tell their timeout (it must learn
their patience) and with clients that send it as `timeout_s`. The engine's batch-1 rate comes
from one patient user on the unbatched server in the same run. Then patient clients (the
`saturate` scenario) against batching with the adaptive scheduler off and on: what learning
costs when nobody leaves.

The engine is `--model sim` (a + b*n ms per batch of n, slept step by step), so the policy
comparison is not at the mercy of a CPU shared with other work.
"""

from __future__ import annotations

import argparse
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serve import Load, batchserve_cmd, percentile, run_locust, server, summarize

ARMS = {
    "unbatched": ("--max-batch-size", "1", "--adaptive-batch", "off"),
    "batched": ("--adaptive-batch", "off"),
    "adaptive": ("--adaptive-batch", "on"),
    "adaptive-told": ("--adaptive-batch", "on"),  # clients send timeout_s
}
COUNTERS = ("batchserve_images_total", "batchserve_wasted_images_total",
            "batchserve_batches_interrupted_total", "batchserve_requests_rejected_total")


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--goodput-base-ms", type=float, default=100.0,
                   help="goodput: sim engine's fixed ms per batch")
    p.add_argument("--goodput-per-image-ms", type=float, default=400.0,
                   help="goodput: sim engine's ms per image (batch of 8: 3.3 s)")
    p.add_argument("--goodput-timeout-s", type=float, default=2.0,
                   help="goodput: client timeout (4 x one image, under one full batch)")
    p.add_argument("--goodput-users", type=int, default=16)
    p.add_argument("--goodput-duration-s", type=float, default=60.0)
    p.add_argument("--goodput-warm-s", type=float, default=15.0)
    p.add_argument("--goodput-steps", type=int, default=20)
    p.add_argument("--goodput-arms", default=",".join(ARMS), help="goodput: servers to run")
    p.add_argument("--goodput-model", default="sim",
                   help="goodput: sim (the default: timing without CPU) or a real model such "
                        "as tiny, served at --goodput-size")
    p.add_argument("--goodput-size", default="64x64x20", help="goodput: WxHxSTEPS")
    p.add_argument("--goodput-patient-s", type=float, default=None,
                   help="goodput: seconds per patient-clients arm (default half the "
                        "impatient duration; 0 skips them)")


def quick(opts: argparse.Namespace) -> None:
    opts.goodput_base_ms, opts.goodput_per_image_ms, opts.goodput_timeout_s = 20.0, 150.0, 0.3
    opts.goodput_users, opts.goodput_duration_s, opts.goodput_warm_s = 8, 3.0, 0.5
    opts.goodput_arms = "unbatched,batched,adaptive"


def check_sizes(opts: argparse.Namespace) -> None:
    if opts.goodput_model != "sim":
        return  # checked against the measured batch-1 time instead (see `run`)
    one = (opts.goodput_base_ms + opts.goodput_per_image_ms) / 1000
    full = (opts.goodput_base_ms + opts.goodput_per_image_ms * opts.max_batch_size) / 1000
    if not one < opts.goodput_timeout_s < full:
        raise SystemExit(f"goodput: the client timeout {opts.goodput_timeout_s} s must lie "
                         f"between one image ({one:.2f} s) and a full batch ({full:.2f} s)")


def run(opts: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    check_sizes(opts)
    w, h, steps = (int(n) for n in opts.goodput_size.split("x"))
    size = (w, h, steps if opts.goodput_model != "sim" else opts.goodput_steps)
    if opts.goodput_model == "sim":
        model = ["--model", "sim", "--sim-base-ms", str(opts.goodput_base_ms),
                 "--sim-per-image-ms", str(opts.goodput_per_image_ms), "--warmup", ""]
    else:
        model = ["--model", opts.goodput_model, "--device", opts.device,
                 "--warmup", "x".join(map(str, size))]
    sim = [*model, "--max-batch-size", str(opts.max_batch_size), "--max-wait-ms",
           str(opts.max_wait_ms)]
    timeout = opts.goodput_timeout_s
    points = []
    for arm in opts.goodput_arms.split(","):
        args = ARMS[arm]
        told = arm == "adaptive-told"
        env = (("BENCH_CLIENT_TIMEOUT_S", str(timeout)), ("BENCH_SEND_TIMEOUT", "1" if told
                                                            else "0"))
        load = Load("impatient", opts.goodput_users, opts.goodput_duration_s,
                    opts.goodput_warm_s, size, env)
        with server(batchserve_cmd([*sim, *args]), workdir / f"goodput-{arm}.server.log") as url:
            if arm == "unbatched":  # the engine's batch-1 rate, one patient user
                one = Load("single_user", 1, opts.goodput_duration_s / 3,
                           min(2.0, opts.goodput_warm_s), size)
                print("  goodput-batch1: 1 patient user", flush=True)
                figures = summarize(run_locust(url, one, workdir, "goodput-batch1"), one)
                points.append({"part": "goodput", "arm": "batch1", "users": 1, **figures})
                if figures.get("p50_ms", 0) >= timeout * 1000:
                    print(f"  warning: one image takes {figures['p50_ms']:.0f} ms here, over "
                          f"the client timeout of {timeout:g} s", flush=True)
            print(f"  goodput-{arm}: {load.users} impatient users ({timeout:g} s), "
                  f"{load.duration_s:g} s", flush=True)
            records = run_locust(url, load, workdir, f"goodput-{arm}")
            counters = scrape(url)
        points.append({"part": "goodput", "arm": arm, "users": load.users,
                       **impatient_figures(records, load, timeout), **counters})
    if opts.goodput_patient_s != 0:
        points += run_patient(opts, workdir, sim, size)
    return points


def run_patient(opts: argparse.Namespace, workdir: Path, sim: list[str],
                size: tuple[int, int, int]) -> list[dict[str, Any]]:
    points = []
    duration = opts.goodput_patient_s or opts.goodput_duration_s / 2
    for arm in ("batched", "adaptive"):
        load = Load("saturate", opts.goodput_users, duration, opts.goodput_warm_s / 2, size)
        name = f"patient-{arm}"
        with server(batchserve_cmd([*sim, *ARMS[arm]]), workdir / f"{name}.server.log") as url:
            print(f"  {name}: {load.users} patient users, {duration:g} s", flush=True)
            figures = summarize(run_locust(url, load, workdir, name), load)
        points.append({"part": "patient", "arm": arm, "users": load.users, **figures})
    return points


def impatient_figures(records: list[dict[str, Any]], load: Load, timeout_s: float
                      ) -> dict[str, Any]:
    """Goodput: images that reached their client before it gave up, per second of the window
    after warm-up; and what happened to the rest."""
    if not records:
        return {"requests": 0, "goodput": 0.0}
    t0 = min(r["start"] for r in records)
    lo, hi = t0 + load.warm_s, t0 + load.duration_s
    window = [r for r in records if lo <= r["start"] and r["end"] <= hi]
    delivered = [r for r in window if r["ok"] and r["end"] - r["start"] <= timeout_s]
    latencies = [(r["end"] - r["start"]) * 1000 for r in delivered]
    return {
        "requests": len(window),
        "delivered": len(delivered),
        "goodput": round(len(delivered) / (hi - lo), 4),
        "gave_up": sum(r["status"] == 0 for r in window),
        "refused_503": sum(r["status"] == 503 for r in window),
        "refused_504": sum(r["status"] == 504 for r in window),
        "p50_ms": round(percentile(latencies, 0.50), 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 0.95), 1) if latencies else None,
        "mean_batch_size": round(len(delivered) / sum(1 / r["batch_size"] for r in delivered), 2)
        if delivered else 0.0,
    }


def scrape(url: str) -> dict[str, float]:
    """The server's own counts over the whole run (warm-up included): generated, wasted."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    totals = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return {"generated": totals["batchserve_images_total"],
            "wasted": totals["batchserve_wasted_images_total"],
            "interrupted_batches": totals["batchserve_batches_interrupted_total"]}


def targets(results: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(target, measured, bound, higher is better) for the issue's three goodput targets."""
    pts = {(p["part"], p["arm"]): p for p in results["points"]
           if p["part"] in ("goodput", "patient")}
    out: list[tuple[str, float, float, bool]] = []
    batch1, adaptive = pts.get(("goodput", "batch1")), pts.get(("goodput", "adaptive"))
    if batch1 and adaptive and batch1["images_per_s"]:
        out.append(("impatient clients: adaptive goodput / engine batch-1 images/s",
                    adaptive["goodput"] / batch1["images_per_s"], 0.7, True))
    if adaptive and adaptive["generated"]:
        out.append(("impatient clients: adaptive wasted / generated images",
                    adaptive["wasted"] / adaptive["generated"], 0.05, False))
    off, on = pts.get(("patient", "batched")), pts.get(("patient", "adaptive"))
    if off and on and off["images_per_s"]:
        out.append(("patient clients: adaptive / today's batching images/s",
                    on["images_per_s"] / off["images_per_s"], 0.97, True))
    return out


def markdown(results: dict[str, Any]) -> list[str]:
    cfg = results["config"]
    rows = [p for p in results["points"] if p["part"] == "goodput" and p["arm"] != "batch1"]
    if not rows:
        return []
    batch1 = next((p for p in results["points"] if p["arm"] == "batch1"), None)
    engine = (f"sim engine {cfg['goodput_base_ms']:g} ms + {cfg['goodput_per_image_ms']:g} "
              f"ms/image, {cfg['goodput_steps']} steps" if cfg.get("goodput_model", "sim") ==
              "sim" else f"`{cfg['goodput_model']}` model at {cfg['goodput_size']}")
    lines = [f"Impatient clients: {engine}, max batch {cfg['max_batch_size']}, "
             f"{cfg['goodput_users']} closed-loop users giving up after "
             f"{cfg['goodput_timeout_s']:g} s; engine batch-1 rate (1 patient user, "
             f"unbatched): {batch1['images_per_s'] if batch1 else float('nan'):.3f} images/s.",
             "", "| server | goodput images/s | delivered p50 ms | p95 ms | mean batch | gave up "
             "| 503 | 504 | generated | wasted | interrupted batches |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in rows:
        lines.append(
            f"| {p['arm']} | {p['goodput']:.3f} | {_ms(p['p50_ms'])} | {_ms(p['p95_ms'])} | "
            f"{p['mean_batch_size']:.2f} | {p['gave_up']} | {p['refused_503']} | "
            f"{p['refused_504']} | {p['generated']:.0f} | {p['wasted']:.0f} | "
            f"{p['interrupted_batches']:.0f} |")
    patient = [p for p in results["points"] if p["part"] == "patient"]
    if patient:
        lines += ["", "| patient clients (saturate) | users | images/s | p50 ms | p95 ms "
                  "| mean batch |", "|---|---:|---:|---:|---:|---:|"]
        for p in patient:
            lines.append(f"| {p['arm']} | {p['users']} | {p['images_per_s']:.3f} | "
                         f"{p['p50_ms']:.0f} | {p['p95_ms']:.0f} | {p['mean_batch_size']:.2f} |")
    return [*lines, ""]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
