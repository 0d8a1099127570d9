"""The open-loop run as a markdown table, the issue's targets checked, and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

POLICIES = ("deadline", "eager", "continuous")


def _at(results: dict[str, Any], mix: str, load: float) -> dict[str, Any] | None:
    for point in results["points"]:
        if point["mix"] == mix and abs(point["load"] - load) < 1e-9:
            policies: dict[str, Any] = point["policies"]
            return policies
    return None


def targets(results: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(target, measured ratio, bound, met) for each target the run has the points for."""
    rows: list[tuple[str, float, float, bool]] = []

    def ratio(name: str, mix: str, load: float, field: str, base: str, bound: float,
              at_least: bool = False) -> None:
        point = _at(results, mix, load)
        if point is None or not point[base][field]:
            return
        r = point["continuous"][field] / point[base][field]
        rows.append((name, r, bound, r >= bound if at_least else r <= bound))

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
        lines += ["", "| target | measured | bound | met |", "|---|---|---|---|"]
        lines += [f"| {name} | {r:.2f} | {'>=' if 'images' in name else '<='} {bound} | "
                  f"{'yes' if ok else 'NO'} |" for name, r, bound, ok in rows]
    return "\n".join(lines) + "\n"


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
