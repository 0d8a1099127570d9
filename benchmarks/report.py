"""Turns one run's results into the targets check, a markdown table, CSV, JSON and charts."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import goodput

ARM_LABELS = {
    "unbatched": "unbatched (max batch 1)",
    "batched": "batched (deadline)",
    "eager": "batched (eager)",
}
OVERHEAD_LABELS = {
    "bare": "bare Starlette endpoint (PNG encoded once)",
    "bare-encoding": "bare Starlette endpoint encoding a PNG per request",
    "null": "batchserve, null engine (default 8 / 500 ms)",
}
JOB_LABELS = {
    "t2i": "/t2i (the client waits on the connection)",
    "jobs-memory": "async jobs, memory queue",
    "jobs-redis": "async jobs, Redis queue",
}
CSV_FIELDS = ("part", "arm", "users", "images_per_s", "p50_ms", "p95_ms", "p99_ms",
              "mean_batch_size", "mean_queue_ms", "measured", "requests", "failures",
              "goodput", "delivered", "gave_up", "refused_503", "refused_504", "generated",
              "wasted", "interrupted_batches", "p50_ready_ms")
# The jobs scenario's poll schedule (benchmarks/locustfiles/jobs.py): 0.25 s doubling to 2 s.
POLL_FIRST_S, POLL_MAX_S = 0.25, 2.0


def poll_gap_ms(elapsed_ms: float) -> float:
    """The gap between the two polls around `elapsed_ms` after submitting: what polling can
    add to the wait for a job that finished then."""
    at, gap = 0.0, POLL_FIRST_S * 1000
    while at + gap < elapsed_ms:
        at += gap
        gap = min(gap * 2, POLL_MAX_S * 1000)
    return gap


def _point(results: dict[str, Any], part: str, arm: str, users: int) -> dict[str, Any] | None:
    points: list[dict[str, Any]] = results["points"]
    for p in points:
        if (p["part"], p["arm"], p["users"]) == (part, arm, users):
            return p
    return None


def _max_users(results: dict[str, Any], part: str) -> int | None:
    users = [p["users"] for p in results["points"] if p["part"] == part]
    return max(users) if users else None


def best_raw(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per batch size, the faster of the raw runs before and after the served ones: the
    stricter limit to compare the server with."""
    best: dict[str, dict[str, Any]] = {}
    for key in ("raw", "raw_after"):
        for n, run in results.get(key, {}).get("batches", {}).items():
            if n not in best or run["median_s"] < best[n]["median_s"]:
                best[n] = run
    return best


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value, the bound and whether it holds."""
    out: list[dict[str, Any]] = []
    cfg = results["config"]

    def add(name: str, value: float | None, bound: float, higher_is_better: bool,
            unit: str) -> None:
        if value is None or math.isnan(value):
            return
        ok = value >= bound if higher_is_better else value <= bound
        out.append({"target": name, "measured": round(value, 3), "bound": round(bound, 3),
                    "unit": unit, "met": ok, "direction": ">=" if higher_is_better else "<="})

    raw = best_raw(results)
    b1 = raw.get("1")
    bmax = raw.get(str(cfg["max_batch_size"]))
    top = _max_users(results, "served")
    batched = _point(results, "served", "batched", top) if top else None
    unbatched = _point(results, "served", "unbatched", top) if top else None
    if batched and bmax:
        add(f"served batched at {top} users / raw batch {cfg['max_batch_size']}",
            batched["images_per_s"] / bmax["images_per_s"], 0.9, True, "ratio")
    if batched and unbatched and unbatched["images_per_s"]:
        add(f"served batched / unbatched at {top} users",
            batched["images_per_s"] / unbatched["images_per_s"], 1.5, True, "ratio")
    if b1:
        raw_ms = b1["median_s"] * 1000
        one = _point(results, "served", "batched", 1)
        if one:
            add("1 user p50, deadline policy", one["p50_ms"],
                raw_ms + cfg["max_wait_ms"] + 50, False, "ms")
        one = _point(results, "served", "eager", 1)
        if one:
            add("1 user p50, eager policy", one["p50_ms"], raw_ms + 30, False, "ms")
    for name, value, bound, higher in goodput.targets(results):
        add(name, value, bound, higher, "ratio")
    _job_targets(results, add)
    bare = _point(results, "overhead", "bare", cfg["overhead_users"])
    null = _point(results, "overhead", "null", cfg["overhead_users"])
    if bare and null and bare["images_per_s"]:
        add("null engine / bare Starlette requests/s",
            null["images_per_s"] / bare["images_per_s"], 0.5, True, "ratio")
    return out


def _job_targets(results: dict[str, Any], add: Callable[..., None]) -> None:
    """Jobs >= 90% of /t2i images/s at saturation; at one user, the job path's p50 within
    50 ms of /t2i's plus the poll interval (and within 50 ms without it: when it was ready)."""
    top = _max_users(results, "jobs")
    t2i_top = _point(results, "jobs", "t2i", top) if top else None
    t2i_one = _point(results, "jobs", "t2i", 1)
    for arm in ("jobs-memory", "jobs-redis"):
        name = arm.removeprefix("jobs-")
        jobs_top = _point(results, "jobs", arm, top) if top else None
        if t2i_top and jobs_top and t2i_top["images_per_s"]:
            add(f"jobs ({name}) / t2i images/s at {top} users",
                jobs_top["images_per_s"] / t2i_top["images_per_s"], 0.9, True, "ratio")
        jobs_one = _point(results, "jobs", arm, 1)
        if t2i_one and jobs_one:
            base = t2i_one["p50_ms"]
            add(f"jobs ({name}) 1 user p50 overhead, polling included",
                jobs_one["p50_ms"] - base, 50 + poll_gap_ms(base), False, "ms")
            if "p50_ready_ms" in jobs_one:
                add(f"jobs ({name}) 1 user p50 overhead to image ready",
                    jobs_one["p50_ready_ms"] - base, 50, False, "ms")


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    model_parts = "raw" in results or any(p["part"] == "served" for p in results["points"])
    model = f"Model `{cfg['model']}`, {cfg['size']} (WxHxsteps), max" if model_parts else "Max"
    lines = [f"{model} batch {cfg['max_batch_size']}, max wait {cfg['max_wait_ms']:g} ms; "
             f"{results['machine']['cpus']} CPUs; {results['elapsed_s']:g} s in all.", ""]
    for key, when in (("raw", "before"), ("raw_after", "after")):
        raw = results.get(key)
        if not raw:
            continue
        lines += [f"| raw pipeline, in-process ({when} the served runs) | seconds per batch "
                  "(median) | images/s |", "|---|---:|---:|"]
        for n, r in raw["batches"].items():
            lines.append(f"| batch {n} | {r['median_s']:.3f} | {r['images_per_s']:.3f} |")
        lines.append("")
    for part, title in (("served", f"served, `{cfg['model']}`"),
                        ("sim-gpu", f"sim-gpu ({cfg['sim_base_ms']:g} ms + "
                                    f"{cfg['sim_per_image_ms']:g} ms/image)")):
        rows = [p for p in results["points"] if p["part"] == part]
        if not rows:
            continue
        lines += [f"| {title} | users | images/s | p50 ms | p95 ms | p99 ms | mean batch "
                  "| failures |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in rows:
            lines.append(f"| {ARM_LABELS.get(p['arm'], p['arm'])} | {p['users']} | "
                         f"{p['images_per_s']:.3f} | {p['p50_ms']:.0f} | {p['p95_ms']:.0f} | "
                         f"{p['p99_ms']:.0f} | {p['mean_batch_size']:.2f} | {p['failures']} |")
        lines.append("")
    lines += goodput.markdown(results)
    rows = [p for p in results["points"] if p["part"] == "overhead"]
    if rows:
        lines += ["| serving overhead (64x64, null engine) | users | requests/s | p50 ms "
                  "| p99 ms | failures |", "|---|---:|---:|---:|---:|---:|"]
        for p in rows:
            label = OVERHEAD_LABELS.get(p["arm"], p["arm"])
            lines.append(f"| {label} | {p['users']} | {p['images_per_s']:.0f} | "
                         f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['failures']} |")
        lines.append("")
    rows = [p for p in results["points"] if p["part"] == "jobs"]
    if rows:
        lines += [f"| jobs vs /t2i (sim {cfg['jobs_sim_base_ms']:g} ms + "
                  f"{cfg['jobs_sim_per_image_ms']:g} ms/image, 64x64) | users | images/s "
                  "| p50 ms | p50 ready ms | p99 ms | mean batch | failures |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in rows:
            ready = p.get("p50_ready_ms")
            lines.append(f"| {JOB_LABELS.get(p['arm'], p['arm'])} | {p['users']} | "
                         f"{p['images_per_s']:.2f} | {p['p50_ms']:.0f} | "
                         f"{'' if ready is None else f'{ready:.0f}'} | {p['p99_ms']:.0f} | "
                         f"{p['mean_batch_size']:.2f} | {p['failures']} |")
        lines.append("")
    if results["targets"]:
        lines += ["| target | measured | bound | met |", "|---|---:|---:|:---:|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']:g} {t['unit']} | {t['direction']} "
                         f"{t['bound']:g} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def emit_json(results: dict[str, Any], path: Path | None) -> None:
    """A one-shot benchmark's results: printed, and written to `path` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def write(results: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    with (out / "bench.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results["points"])
    table = markdown(results)
    (out / "bench.md").write_text(table)
    charts(results, out)
    return table


def charts(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw = best_raw(results)
    cfg = results["config"]
    for part, filename, title in (
        ("served", "served.png", f"batchserve, {cfg['model']} model, {cfg['size']}"),
        ("sim-gpu", "sim_gpu.png", f"simulated GPU: {cfg['sim_base_ms']:g} ms + "
                                   f"{cfg['sim_per_image_ms']:g} ms per image"),
    ):
        rows = [p for p in results["points"] if p["part"] == part]
        if not rows:
            continue
        fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
        for arm, label in ARM_LABELS.items():
            pts = sorted((p for p in rows if p["arm"] == arm), key=lambda p: p["users"])
            if not pts:
                continue
            users = [p["users"] for p in pts]
            ax_t.plot(users, [p["images_per_s"] for p in pts], marker="o", label=label)
            ax_l.plot(users, [p["p95_ms"] / 1000 for p in pts], marker="o", label=label)
        if part == "served":
            for n, style in (("1", ":"), (str(cfg["max_batch_size"]), "--")):
                if n in raw:
                    ax_t.axhline(raw[n]["images_per_s"], color="grey", linestyle=style,
                                 label=f"raw pipeline, batch {n}")
        else:
            limit = cfg["max_batch_size"] * 1000 / (
                cfg["sim_base_ms"] + cfg["sim_per_image_ms"] * cfg["max_batch_size"])
            ax_t.axhline(limit, color="grey", linestyle="--",
                         label=f"engine limit, batch {cfg['max_batch_size']}")
        ax_t.set(title="throughput", xlabel="concurrent users", ylabel="images / s")
        ax_l.set(title="p95 latency", xlabel="concurrent users", ylabel="seconds")
        ticks = sorted({p["users"] for p in rows})
        for ax in (ax_t, ax_l):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
        ax_t.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)
