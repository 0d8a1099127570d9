"""The open-loop run as a markdown table, the issue's targets checked (each ratio with a
bootstrap interval), and a chart."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

POLICIES = ("deadline", "eager", "continuous")


def _at(results: dict[str, Any], mix: str, load: float) -> dict[str, Any] | None:
    for point in results["points"]:
        if point["mix"] == mix and abs(point["load"] - load) < 1e-9:
            policies: dict[str, Any] = point["policies"]
            return policies
    return None


Interval = tuple[float, float]
Target = tuple[str, float, Interval | None, float, bool]  # name, ratio, interval, bound, met


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
        if point is None or not point[base][field]:
            return
        r = point["continuous"][field] / point[base][field]
        q = {"p50_ms": 0.5, "p95_ms": 0.95}.get(field)
        spread = None
        if q is not None and "lat_ms" in point[base]:
            spread = interval(point["continuous"]["lat_ms"], point[base]["lat_ms"], q)
        rows.append((name, r, spread, bound, r >= bound if at_least else r <= bound))

    ratio("mixed 60%: continuous p50 / deadline p50", "mixed", 0.6, "p50_ms", "deadline", 0.6)
    ratio("mixed 60%: continuous p50 / eager p50", "mixed", 0.6, "p50_ms", "eager", 0.6)
    ratio("mixed 60%: continuous p95 / deadline p95", "mixed", 0.6, "p95_ms", "deadline", 0.6)
    ratio("one key 60%: continuous p50 / deadline p50", "one-key", 0.6, "p50_ms", "deadline",
          0.85)
    loads = sorted({p["load"] for p in results["points"]})
    if loads and loads[-1] > 1.0:
        for mix in ("one-key", "mixed"):
            ratio(f"{mix} {loads[-1]:.0%} (saturated): continuous images/s / deadline's", mix,
                  loads[-1], "images_per_s", "deadline", 0.95, at_least=True)
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = ["| traffic | load | req/s offered | policy | p50 ms | p95 ms | images/s | "
             "mean X-Batch-Size | failures |", "|---|---|---|---|---|---|---|---|---|"]
    for point in results["points"]:
        for policy in POLICIES:
            f = point["policies"][policy]
            lines.append(f"| {point['mix']} | {point['load']:.0%} | {point['rate']:.2f} | "
                         f"{policy} | {f['p50_ms']:.0f} | {f['p95_ms']:.0f} | "
                         f"{f['images_per_s']:.2f} | {f['mean_batch_size']:.1f} | "
                         f"{f['failures']} |")
    rows = targets(results)
    if rows:
        lines += ["", "| target | measured | 90% interval | bound | met |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {r:.2f} | {_span(spread)} | "
                  f"{'>=' if 'images' in name else '<='} {bound} | {'yes' if ok else 'NO'} |"
                  for name, r, spread, bound, ok in rows]
    return "\n".join(lines) + "\n"


def _span(spread: Interval | None) -> str:
    return "-" if spread is None else f"{spread[0]:.2f}-{spread[1]:.2f}"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = list(dict.fromkeys(p["mix"] for p in results["points"]))
    fig, axes = plt.subplots(1, len(mixes), figsize=(6 * len(mixes), 4.2), squeeze=False)
    colours = {"deadline": "tab:blue", "eager": "tab:orange", "continuous": "tab:green"}
    for ax, mix in zip(axes[0], mixes, strict=True):
        points = [p for p in results["points"] if p["mix"] == mix]
        loads = [p["load"] * 100 for p in points]
        for policy in POLICIES:
            ax.plot(loads, [p["policies"][policy]["p50_ms"] / 1000 for p in points], "-o",
                    color=colours[policy], label=f"{policy} p50")
            ax.plot(loads, [p["policies"][policy]["p95_ms"] / 1000 for p in points], "--",
                    color=colours[policy], label=f"{policy} p95")
        ax.set_title(f"{mix}: latency vs load (open loop, Poisson)")
        ax.set_xlabel("offered load, % of batch-8 capacity")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    text = markdown(results)
    (out / "openloop.md").write_text(text)
    chart(results, out / "openloop.png")
    print(text)
