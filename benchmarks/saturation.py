"""`python -m benchmarks.saturation`: images/s of flush policies at saturation, in alternating
windows, so a shared machine's drift falls on every policy alike.

`benchmarks.openloop` fires one schedule at each policy in turn, a minute or more each. On a
shared VM the CPU's speed moves by 10-20% over such spans (the same server's images/s in 20 s
windows ranged 11.5-15.5 in one run), which is larger than the difference being measured. Here
every policy's server is up at once and only one gets traffic at a time: in each round each
policy gets one window of closed-loop load (`--clients` requests always outstanding, three
batches' worth: the queue never empties, as at saturation), the order reversed every other
round (ABBA: a linear drift falls on both alike), and a policy's window is counted only after
`--settle-s` (the queue refilled after the switch) by whole decode periods
(`serve.throughput`: images arrive in clumps). The ratio is the sum of a policy's windows over
the first policy's; its 90% interval resamples rounds (bootstrap). Loopback only; each window
is bounded in time, the whole run in rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.openloop import CPU_MODELS, MIXES, bodies, server_args
from benchmarks.serve import ROOT, batchserve_cmd, percentile, server, throughput

POLICIES = ("deadline", "eager", "continuous")
TARGET = 0.95  # issue 19: continuous keeps >= 0.95x deadline's images/s at saturation


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.saturation", description=__doc__)
    p.add_argument("--model", choices=("sim", *CPU_MODELS), default="tiny")
    p.add_argument("--policies", default="deadline,continuous",
                   help="comma-separated; the first is the one the others are divided by")
    p.add_argument("--mix", choices=sorted(MIXES), default="one-key")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--window-s", type=float, default=20.0)
    p.add_argument("--settle-s", type=float, default=4.0)
    p.add_argument("--clients", type=int, default=24, help="requests always outstanding")
    p.add_argument("--max-wait-ms", type=float, default=500.0)
    p.add_argument("--step-ms", type=float, default=25.0, help="sim: fixed ms per UNet step")
    p.add_argument("--step-per-image-ms", type=float, default=15.0,
                   help="sim: ms per image per step")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "saturation")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (sim)")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.model, opts.rounds, opts.window_s, opts.settle_s = "sim", 2, 2.0, 0.5
        opts.clients, opts.step_ms, opts.step_per_image_ms = 12, 2.0, 1.0
    opts.policies = tuple(opts.policies.split(","))
    if set(opts.policies) - set(POLICIES) or len(opts.policies) < 2:
        p.error(f"--policies: two or more of {', '.join(POLICIES)}")
    return opts


class Load:
    """Closed-loop load: each client sends its next request when its answer came."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.sent = 0
        self._bodies = bodies(opts.mix, 4096, opts.size, opts.seed)

    def body(self) -> dict[str, Any]:
        # the mix's steps and guidance; every request its own prompt and seed
        body = {**self._bodies[self.sent % len(self._bodies)],
                "prompt": f"saturation {self.sent}", "seed": self.sent}
        self.sent += 1
        return body

    async def window(self, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        """One window on one server: its images/s after `settle_s`, and failures. Every
        request sent is awaited before the next window starts (the servers never overlap)."""
        opts = self.opts
        start = time.perf_counter()
        stop = start + opts.window_s
        ends: list[float] = []
        failed = 0

        async def one_client() -> None:
            nonlocal failed
            while time.perf_counter() < stop:
                resp = await client.post(url + "/t2i", json=self.body())
                if resp.status_code == 200:
                    ends.append(time.perf_counter() - start)
                else:
                    failed += 1

        await asyncio.gather(*(one_client() for _ in range(opts.clients)))
        counted = [t for t in ends if opts.settle_s <= t <= opts.window_s]
        return {"images_per_s": round(throughput(counted), 3), "images": len(counted),
                "failed": failed}


def interval(rounds: list[dict[str, float]], policy: str, base: str, seed: int,
             draws: int = 2000) -> tuple[float, float]:
    """The 90% bootstrap interval of sum(policy) / sum(base), resampling rounds."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(draws):
        picked = [rng.choice(rounds) for _ in rounds]
        ratios.append(sum(r[policy] for r in picked) / sum(r[base] for r in picked))
    return percentile(ratios, 0.05), percentile(ratios, 0.95)


async def run(urls: dict[str, str], opts: argparse.Namespace) -> dict[str, Any]:
    load = Load(opts)
    policies = list(urls)
    rounds: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=600.0,
                                 limits=httpx.Limits(max_connections=4 * opts.clients)) as client:
        for policy in policies:  # a first window each, not counted: caches and pools warmed
            await load.window(client, urls[policy])
        for n in range(opts.rounds):
            order = policies if n % 2 == 0 else policies[::-1]
            windows = {p: await load.window(client, urls[p]) for p in order}
            rounds.append({"round": n, "order": order, "windows": windows})
            line = "  ".join(f"{p} {w['images_per_s']:.2f}/s" for p, w in windows.items())
            print(f"round {n}: {line}", flush=True)
    base = policies[0]
    rates = [{p: r["windows"][p]["images_per_s"] for p in policies} for r in rounds]
    ratios = {}
    for policy in policies[1:]:
        low, high = interval(rates, policy, base, opts.seed)
        ratios[policy] = {"ratio": round(sum(r[policy] for r in rates)
                                         / sum(r[base] for r in rates), 3),
                          "interval": [round(low, 3), round(high, 3)],
                          "per_round": [round(r[policy] / r[base], 3) for r in rates]}
    return {"settings": {k: str(v) for k, v in vars(opts).items()}, "base": base,
            "rounds": rounds, "ratios": ratios,
            "failed": sum(w["failed"] for r in rounds for w in r["windows"].values())}


def write(results: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "saturation.json").write_text(json.dumps(results, indent=1))
    base = results["base"]
    policies = [base, *results["ratios"]]
    lines = ["| round | " + " | ".join(f"{p} images/s" for p in policies) + " | "
             + " | ".join(f"{p} / {base}" for p in policies[1:]) + " |",
             "|---" * (2 * len(policies)) + "|"]
    for r in results["rounds"]:
        w = r["windows"]
        lines.append(f"| {r['round']} | " + " | ".join(f"{w[p]['images_per_s']:.2f}"
                                                      for p in policies) + " | "
                     + " | ".join(f"{w[p]['images_per_s'] / w[base]['images_per_s']:.3f}"
                                  for p in policies[1:]) + " |")
    lines.append("")
    for policy, figures in results["ratios"].items():
        low, high = figures["interval"]
        met = "met" if figures["ratio"] >= TARGET else "MISSED"
        lines.append(f"{policy} / {base} images/s over all rounds: **{figures['ratio']:.3f}** "
                     f"(90% interval {low:.3f}-{high:.3f}; target >= {TARGET}: {met})")
    lines.append(f"\nfailed requests: {results['failed']}")
    text = "\n".join(lines) + "\n"
    (out / "saturation.md").write_text(text)
    _plot(results, out / "saturation.png")
    return text


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    rounds = results["rounds"]
    for policy in [results["base"], *results["ratios"]]:
        ax.plot([r["round"] for r in rounds],
                [r["windows"][policy]["images_per_s"] for r in rounds], marker="o",
                label=policy)
    title = ", ".join(f"{p}/{results['base']} {f['ratio']:.3f}"
                      for p, f in results["ratios"].items())
    ax.set(xlabel="round (policies alternate within each)", ylabel="images/s",
           title=f"saturation, {results['settings']['model']}: {title}")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    logs = opts.out / "runs"  # server logs, not committed
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # the servers `benchmarks.openloop` starts, one per policy
        urls = {policy: stack.enter_context(server(batchserve_cmd(server_args(opts, policy)),
                                                   logs / f"{policy}.log"))
                for policy in opts.policies}
        results = asyncio.run(run(urls, opts))
    print(write(results, opts.out), end="")


if __name__ == "__main__":
    main()
