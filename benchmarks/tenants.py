"""Tenants benchmark (sim engine, one run): does a flooding tenant still let another one in?

Tenant A keeps `--flood` requests in flight (closed loop: each answer sends the next one), so
the queue stays full; tenant B sends one request a second. Per flush policy, three servers:

- `alone`: B by itself (its baseline p95);
- `today`: one `--api-key` for both (one tenant: the queue is fair between keys and
  priorities, not between clients);
- `fair`: `--api-keys` with A weight 3 and B weight 1.

Then `share`: both tenants saturate the `fair` server; images per tenant should be 3:1, and
total images/s match `today` with the same saturating load.

    python -m benchmarks.tenants --out benchmarks/results/tenants [--duration-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serve import batchserve_cmd, percentile, server

KEY_A, KEY_B = "sk-tenant-a-0001", "sk-tenant-b-0002"
TENANTS = f"""
[tenants.a]
key = "{KEY_A}"
weight = 3

[tenants.b]
key = "{KEY_B}"
weight = 1
"""
BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "inference_steps": 4}
SIM = {
    "deadline": ("--flush-policy", "deadline", "--sim-base-ms", "40", "--sim-per-image-ms",
                 "20"),
    "continuous": ("--flush-policy", "continuous", "--sim-step-ms", "10",
                   "--sim-step-per-image-ms", "5"),
}


async def _closed_loop(client: httpx.AsyncClient, key: str, until: float,
                       done: list[tuple[float, float]]) -> None:
    while time.monotonic() < until:
        t0 = time.monotonic()
        r = await client.post("/t2i", json=BODY, headers={"authorization": f"Bearer {key}"})
        if r.status_code == 200:
            done.append((t0, time.monotonic() - t0))
        else:
            await asyncio.sleep(0.05)


async def _paced(client: httpx.AsyncClient, key: str, until: float, every_s: float,
                 done: list[tuple[float, float]]) -> None:
    async def one() -> None:
        t0 = time.monotonic()
        r = await client.post("/t2i", json=BODY, headers={"authorization": f"Bearer {key}"})
        if r.status_code == 200:
            done.append((t0, time.monotonic() - t0))

    tasks = []
    while time.monotonic() < until:
        tasks.append(asyncio.create_task(one()))
        await asyncio.sleep(every_s)
    await asyncio.gather(*tasks)


async def _load(url: str, key_a: str, key_b: str, flood: int, b_saturates: bool,
                duration_s: float, warm_s: float) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=2 * flood + 64)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.monotonic()
        until = start + warm_s + duration_s
        a: list[tuple[float, float]] = []
        b: list[tuple[float, float]] = []
        jobs = [_closed_loop(client, key_a, until, a) for _ in range(flood)]
        jobs += ([_closed_loop(client, key_b, until, b) for _ in range(flood)] if b_saturates
                 else [_paced(client, key_b, until, 1.0, b)])
        await asyncio.gather(*jobs)
    measured_from = start + warm_s

    def ended_in_window(xs: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(t, lat) for t, lat in xs if measured_from <= t + lat <= until]

    wa, wb = ended_in_window(a), ended_in_window(b)
    return {"a_images": len(wa), "b_images": len(wb),
            "images_per_s": (len(wa) + len(wb)) / duration_s,
            "b_p95_s": percentile([lat for t, lat in b if t >= measured_from], 0.95),
            "b_p50_s": percentile([lat for t, lat in b if t >= measured_from], 0.5)}


def _b_alone(url: str, key_b: str, duration_s: float, warm_s: float) -> dict[str, Any]:
    return asyncio.run(_load(url, key_b, key_b, 0, False, duration_s, warm_s))


def run(out: Path, duration_s: float, warm_s: float, flood: int,
        policies: Sequence[str]) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    keys = Path(tempfile.mkdtemp()) / "tenants.toml"
    keys.write_text(TENANTS)
    results: dict[str, Any] = {}
    for policy in policies:
        common = ["--model", "sim", "--warmup", "", "--max-batch-size", "8",
                  "--max-queue", str(4 * flood), *SIM[policy]]
        today = batchserve_cmd([*common, "--api-key", KEY_A])
        fair = batchserve_cmd([*common, "--api-keys", str(keys)])
        row: dict[str, Any] = {}
        with server(fair, out / f"{policy}-alone.log") as url:
            row["alone"] = _b_alone(url, KEY_B, duration_s, warm_s)
        with server(today, out / f"{policy}-today.log") as url:
            row["today"] = asyncio.run(_load(url, KEY_A, KEY_A, flood, False, duration_s,
                                             warm_s))
            row["today_saturated"] = asyncio.run(_load(url, KEY_A, KEY_A, flood, True,
                                                       duration_s, warm_s))
        with server(fair, out / f"{policy}-fair.log") as url:
            row["fair"] = asyncio.run(_load(url, KEY_A, KEY_B, flood, False, duration_s,
                                            warm_s))
            row["share"] = asyncio.run(_load(url, KEY_A, KEY_B, flood, True, duration_s,
                                             warm_s))
        share = row["share"]
        row["summary"] = {
            "b_p95_alone_s": row["alone"]["b_p95_s"],
            "b_p95_today_s": row["today"]["b_p95_s"],
            "b_p95_fair_s": row["fair"]["b_p95_s"],
            "fair_over_alone": row["fair"]["b_p95_s"] / row["alone"]["b_p95_s"],
            "share_a_to_b": share["a_images"] / max(share["b_images"], 1),
            "images_per_s_today": row["today_saturated"]["images_per_s"],
            "images_per_s_fair": share["images_per_s"],
        }
        results[policy] = row
        print(policy, json.dumps(row["summary"], indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/tenants"))
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--warm-s", type=float, default=5.0)
    p.add_argument("--flood", type=int, default=200, help="tenant A's requests in flight")
    p.add_argument("--policies", default="deadline,continuous")
    opts = p.parse_args(argv)
    run(opts.out, opts.duration_s, opts.warm_s, opts.flood, opts.policies.split(","))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
