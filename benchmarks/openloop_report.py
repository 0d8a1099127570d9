"""The open-loop run as a markdown table, the issue's targets checked (each ratio with a
bootstrap interval), and a chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.serve import percentile

POLICIES = ("deadline", "eager", "continuous")


def _at(results: dict[str, Any], mix: str, load: float) -> dict[str, Any] | None:
    for point in results["points"]:
        if point["mix"] == mix and abs(point["load"] - load) < 1e-9:
            found: dict[str, Any] = point
            return found
    return None


Interval = tuple[float, float]


class Target(NamedTuple):
    name: str
    ratio: float  # continuous over the other policy, measured
    interval: Interval | None  # its 90% bootstrap interval
    bound: float
    met: bool
    model: float | None  # the same ratio in the ideal model, on the same arrivals


def model(results: dict[str, Any]) -> None:
    """Adds `model` to each point: each policy's p50 / p95 in `benchmarks.ideal`'s event model
    (no serving overhead) on the very arrivals the run sent (same schedule, same bodies, the
    same warm-up left out), so each measured figure has its ideal beside it."""
    from benchmarks import ideal, openloop

    settings = results["settings"]
    cost = ("step_ms", "step_per_image_ms") if settings["model"] == "sim" else (
        "cpu_step_ms", "cpu_step_per_image_ms")
    step, per = (float(settings[k]) for k in cost)
    seed, warm_s = int(settings["seed"]), float(settings["warm_s"])
    for point in results["points"]:
        sent = openloop.Point(point["mix"], point["load"],
                              point["load"] * openloop.capacity(point["mix"], step, per))
        times, bodies = openloop.requests(sent, int(settings["max_requests"]),
                                          float(settings["duration_s"]), int(settings["size"]),
                                          seed)
        # the steps it runs (fewer for img2img): with every request at 20 steps, that is also
        # the start step, which the whole-batch policies' key adds
        arrivals = [(t, (openloop.steps_run(b), b["guidance_scale"]))
                    for t, b in zip(times, bodies, strict=True)]
        runs = ideal.policies(arrivals, step, per, float(settings["max_wait_ms"]) / 1000)
        point["model"] = {
            policy: {f"p{q}_ms": percentile([lat * 1000 for (t, _), lat in zip(
                arrivals, runs[policy], strict=True) if t >= warm_s], q / 100) for q in (50, 95)}
            for policy in point["policies"]}


def interval(a: Sequence[float | None], b: Sequence[float | None], q: float, *,
             block: int = 50, draws: int = 2000, seed: int = 0) -> Interval | None:
    """The 90% moving-block bootstrap interval of percentile q of `a` over percentile q of `b`,
    over the requests measured under both (the lists are indexed by the shared schedule).

    Blocks of consecutive requests, not single requests, are resampled: a request's latency
    depends on its neighbours' (they share a queue), and resampling them one by one would
    pretend they were independent and understate the spread."""
    import numpy as np

    pairs = np.array([(x, y) for x, y in zip(a, b, strict=True)
                      if x is not None and y is not None], dtype=float)
    n = len(pairs)
    if n < 8:
        return None
    block = max(1, min(block, n // 4))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(draws, math.ceil(n / block)))
    index = (starts[:, :, None] + np.arange(block)).reshape(draws, -1)[:, :n]
    ratios = (np.percentile(pairs[index, 0], q * 100, axis=1)
              / np.percentile(pairs[index, 1], q * 100, axis=1))
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


def targets(results: dict[str, Any]) -> list[Target]:
    """(target, measured ratio, its 90% interval, bound, met) for each target the run has the
    points for; images/s at saturation has no interval (it is one count over one span)."""
    rows: list[Target] = []

    def ratio(name: str, mix: str, load: float, field: str, base: str, bound: float,
              at_least: bool = False) -> None:
        point = _at(results, mix, load)
        if (point is None or not {base, "continuous"} <= point["policies"].keys()
                or not point["policies"][base][field]):
            return
        measured = point["policies"]
        r = measured["continuous"][field] / measured[base][field]
        q = {"p50_ms": 0.5, "p95_ms": 0.95}.get(field)
        spread = ideal = None
        if q is not None and "lat_ms" in measured[base]:
            spread = interval(measured["continuous"]["lat_ms"], measured[base]["lat_ms"], q)
        if q is not None and "model" in point:
            ideal = point["model"]["continuous"][field] / point["model"][base][field]
        rows.append(Target(name, r, spread, bound, r >= bound if at_least else r <= bound,
                           ideal))

    ratio("mixed 60%: continuous p50 / deadline p50", "mixed", 0.6, "p50_ms", "deadline", 0.6)
    ratio("mixed 60%: continuous p50 / eager p50", "mixed", 0.6, "p50_ms", "eager", 0.6)
    ratio("mixed 60%: continuous p95 / deadline p95", "mixed", 0.6, "p95_ms", "deadline", 0.6)
    ratio("img2img 60%: continuous p50 / deadline p50", "img2img", 0.6, "p50_ms", "deadline",
          0.6)
    ratio("one key 60%: continuous p50 / deadline p50", "one-key", 0.6, "p50_ms", "deadline",
          0.85)
    loads = sorted({p["load"] for p in results["points"]})
    if loads and loads[-1] > 1.0:
        for mix in ("one-key", "mixed"):
            ratio(f"{mix} {loads[-1]:.0%} (saturated): continuous images/s / deadline's", mix,
                  loads[-1], "images_per_s", "deadline", 0.95, at_least=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    """The figures of every point and policy (the ideal model's beside them when `model` ran),
    then the targets."""
    lines = ["| traffic | load | req/s offered | policy | measured p50 / p95 ms | model p50 / "
             "p95 ms | images/s | mean X-Batch-Size | failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for point in results["points"]:
        for policy in point["policies"]:  # a run may take some (`--policies`)
            f = point["policies"][policy]
            m = point.get("model", {}).get(policy)
            ideal = "-" if m is None else f"{m['p50_ms']:.0f} / {m['p95_ms']:.0f}"
            lines.append(f"| {point['mix']} | {point['load']:.0%} | {point['rate']:.2f} | "
                         f"{policy} | {f['p50_ms']:.0f} / {f['p95_ms']:.0f} | {ideal} | "
                         f"{f['images_per_s']:.2f} | {f['mean_batch_size']:.1f} | "
                         f"{f['failures']} |")
    rows = targets(results)
    if rows:
        lines += ["", "| target | measured | 90% interval | ideal model | bound | met |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {t.name} | {t.ratio:.2f} | {_span(t.interval)} | "
                  f"{'-' if t.model is None else f'{t.model:.2f}'} | "
                  f"{'>=' if 'images' in t.name else '<='} {t.bound} | "
                  f"{'yes' if t.met else 'NO'} |" for t in rows]
    return "\n".join(lines) + "\n"


def _span(spread: Interval | None) -> str:
    return "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    mixes = list(dict.fromkeys(p["mix"] for p in results["points"]))
    fig, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.2), squeeze=False)
    colours = {"deadline": "tab:blue", "eager": "tab:orange", "continuous": "tab:green"}
    for ax, mix in zip(axes[0], mixes, strict=True):
        points = [p for p in results["points"] if p["mix"] == mix]
        loads = [p["load"] * 100 for p in points]
        ran = [policy for policy in POLICIES if policy in points[0]["policies"]]
        for policy in ran:
            ax.plot(loads, [p["policies"][policy]["p50_ms"] / 1000 for p in points], "-o",
                    color=colours[policy], label=f"{policy} p50")
            ax.plot(loads, [p["policies"][policy]["p95_ms"] / 1000 for p in points], "--",
                    color=colours[policy], label=f"{policy} p95")
            if all("model" in p for p in points):
                ax.plot(loads, [p["model"][policy]["p50_ms"] / 1000 for p in points], "x",
                        color=colours[policy], markersize=9,
                        label="p50 of the ideal model" if policy == ran[-1] else None)
        ax.set_title(f"{mix}: latency vs load (open loop, Poisson)")
        ax.set_xlabel("offered load, % of batch-8 capacity")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    model(results)
    text = markdown(results)
    (out / "openloop.md").write_text(text)
    chart(results, out / "openloop.png")
    print(text)


if __name__ == "__main__":  # the report again from a run's openloop.json: python -m ... DIR
    import json
    import sys

    folder = Path(sys.argv[1])
    write(json.loads((folder / "openloop.json").read_text()), folder)
