"""`python -m benchmarks.ideal`: an ideal event model of the three flush policies (no serving
overhead) under the open-loop benchmark's step-cost model, as the reference for its figures.

A step of n items costs `step + n * per_image` ms; a whole batch of n items and s steps costs s
times that. `continuous`: at every step boundary queued items join (FIFO) up to 8, done items
leave. `deadline` / `eager`: a key's group is due when it holds 8 or its oldest waited
`max_wait` (0 for eager); the engine takes the due group with the oldest item.

`--bounds` says what no schedule can beat: a step of one item is the fastest step there is, so
each request's latency is at least its steps run alone, and any schedule's p50 at least the p50
of those (the floor). Beside it, the best p50 of a family of other schedules: shortest remaining
work first, re-chosen at every step boundary, at most 1, 2, 4 or 8 items a step.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from statistics import median

from benchmarks.openloop import MIXES, capacity, ideal_keys
from benchmarks.serve import percentile

Arrival = tuple[float, tuple[int, float]]


def arrivals(rate: float, keys: Sequence[tuple[int, float]], n: int, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choice(list(keys))))
    return out


def continuous(arr: list[Arrival], step: float, per: float, cap: int = 8) -> list[float]:
    """Each arrival's latency (in arrival order) under continuous batching."""
    now, i, lat = 0.0, 0, [0.0] * len(arr)
    queue: list[int] = []
    active: list[list[int]] = []  # [index, steps left]
    while i < len(arr) or queue or active:
        while i < len(arr) and arr[i][0] <= now:
            queue.append(i)
            i += 1
        while queue and len(active) < cap:
            index = queue.pop(0)
            active.append([index, arr[index][1][0]])
        if not active:
            now = arr[i][0]
            continue
        now += (step + per * len(active)) / 1000
        for item in active:
            item[1] -= 1
            if item[1] <= 0:
                lat[item[0]] = now - arr[item[0]][0]
        active = [x for x in active if x[1] > 0]
    return lat


def shortest_first(arr: list[Arrival], step: float, per: float, cap: int) -> list[float]:
    """Each arrival's latency under a preemptive schedule: at every step boundary the `cap`
    items (queued or running) with the fewest steps left run the next step (ties: oldest)."""
    now, i, lat = 0.0, 0, [0.0] * len(arr)
    waiting: list[list[int]] = []  # [index, steps left]
    while i < len(arr) or waiting:
        while i < len(arr) and arr[i][0] <= now:
            waiting.append([i, arr[i][1][0]])
            i += 1
        if not waiting:
            now = arr[i][0]
            continue
        waiting.sort()  # arrival order first, so the stable sort below breaks ties by age
        waiting.sort(key=lambda item: item[1])
        now += (step + per * min(cap, len(waiting))) / 1000
        for item in waiting[:cap]:
            item[1] -= 1
            if item[1] <= 0:
                lat[item[0]] = now - arr[item[0]][0]
        waiting = [x for x in waiting if x[1] > 0]
    return lat


def bounds(arr: list[Arrival], step: float, per: float, max_wait_s: float = 0.5
           ) -> dict[str, float]:
    """p50 ratios to `deadline`'s on one arrival sequence: continuous's, the floor no schedule
    can go below, and the best of the shortest-first schedules (and its cap)."""
    d = percentile(whole(arr, step, per, max_wait_s), 0.5)
    alone = [key[0] * (step + per) / 1000 for _, key in arr]
    best = min((percentile(shortest_first(arr, step, per, cap), 0.5), cap) for cap in (1, 2, 4, 8))
    return {"continuous": percentile(continuous(arr, step, per), 0.5) / d,
            "floor": percentile(alone, 0.5) / d, "best shortest-first": best[0] / d,
            "its cap": float(best[1])}


def whole(arr: list[Arrival], step: float, per: float, wait: float, cap: int = 8) -> list[float]:
    """Each arrival's latency (in arrival order) under whole batches of one key, due when full
    or when the oldest waited `wait` s."""
    now, i, lat = 0.0, 0, [0.0] * len(arr)
    groups: dict[tuple[int, float], list[int]] = {}  # key -> indices, oldest first
    while i < len(arr) or any(groups.values()):
        while i < len(arr) and arr[i][0] <= now:
            groups.setdefault(arr[i][1], []).append(i)
            i += 1
        due = [(arr[g[0]][0], k) for k, g in groups.items()
               if g and (len(g) >= cap or now - arr[g[0]][0] >= wait - 1e-9)]
        if not due:
            nxt = [arr[g[0]][0] + wait for g in groups.values() if g]
            now = min([*nxt, *([arr[i][0]] if i < len(arr) else [])])
            continue
        _, key = min(due)
        batch, groups[key] = groups[key][:cap], groups[key][cap:]
        now += key[0] * (step + per * len(batch)) / 1000
        for index in batch:
            lat[index] = now - arr[index][0]
    return lat


def policies(arr: list[Arrival], step: float, per: float, max_wait_s: float = 0.5
             ) -> dict[str, list[float]]:
    """Each policy's latencies, in arrival order."""
    return {"deadline": whole(arr, step, per, max_wait_s), "eager": whole(arr, step, per, 0.0),
            "continuous": continuous(arr, step, per)}


def ratios(runs: dict[str, list[float]]) -> dict[str, float]:
    """Continuous against the whole-batch policies (`policies` of one arrival sequence): the
    open-loop report's target ratios."""
    c, d, e = runs["continuous"], runs["deadline"], runs["eager"]
    return {"c/d p50": percentile(c, 0.5) / percentile(d, 0.5),
            "c/e p50": percentile(c, 0.5) / percentile(e, 0.5),
            "c/d p95": percentile(c, 0.95) / percentile(d, 0.95)}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ideal", description=__doc__)
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--step-per-image-ms", type=float, default=15.0)
    p.add_argument("--loads", default="0.3,0.6,0.9")
    p.add_argument("--arrivals", "--requests", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--runs", type=int, default=1,
                   help="> 1: the spread (min / median / max) of the ratios over this many "
                        "seeds, i.e. what one run of --requests requests can tell")
    p.add_argument("--bounds", action="store_true",
                   help="p50 ratios to deadline's that no schedule can beat (the floor) and "
                        "that shortest-remaining-first schedules reach, beside continuous's")
    opts = p.parse_args()
    step, per = opts.step_ms, opts.step_per_image_ms
    for mix in MIXES:
        for load in map(float, opts.loads.split(",")):
            rate = load * capacity(mix, step, per)
            if opts.bounds:
                seen = [bounds(arrivals(rate, ideal_keys(mix), opts.arrivals, opts.seed + k),
                               step, per) for k in range(opts.runs)]
                caps = sorted({int(b["its cap"]) for b in seen})
                print(f"{mix:8s} {load:.0%}, p50 / deadline's, median of {opts.runs} seeds: "
                      + "  ".join(f"{name} {median(b[name] for b in seen):.2f}"
                                  for name in seen[0] if name != "its cap")
                      + f" (cap {'/'.join(map(str, caps))})")
                continue
            if opts.runs > 1:
                draws = [ratios(policies(arrivals(rate, ideal_keys(mix), opts.arrivals,
                                                  opts.seed + k), step, per))
                         for k in range(opts.runs)]
                line = "  ".join(
                    f"{name} {min(v):.2f} / {median(v):.2f} / {max(v):.2f}"
                    for name in draws[0] for v in [[d[name] for d in draws]])
                print(f"{mix:8s} {load:.0%}, {opts.arrivals} requests x {opts.runs} seeds "
                      f"(min / median / max): {line}")
                continue
            arr = arrivals(rate, ideal_keys(mix), opts.arrivals, opts.seed)
            runs = policies(arr, step, per)
            q = {k: (percentile(v, 0.5), percentile(v, 0.95)) for k, v in runs.items()}
            line = "  ".join(f"{k} p50 {a:.2f} p95 {b:.2f} s" for k, (a, b) in q.items())
            r = ratios(runs)
            print(f"{mix:8s} {load:.0%}: {line}  | "
                  + " ".join(f"{k} {v:.2f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
