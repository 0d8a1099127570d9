"""`python -m benchmarks.lone_step`: what serving adds to a lone request under `continuous`.

One `--model sim` service in this process (no network: httpx's ASGI transport) answers
`--requests` 20-step requests one after another; each step sleeps `--step-ms` +
`--step-per-image-ms`. Printed: the median wall time of a request (the first two are not
counted) against the same number of bare `time.sleep` calls of one step each, measured here
too, so the difference is the serving path: the hops to the engine thread and back, the step
loop's bookkeeping, HTTP and PNG encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from batchserve.api import create_app
from batchserve.service import Service
from batchserve.settings import Settings


async def _requests(settings: Settings, steps: int, count: int) -> list[float]:
    service = Service(settings)
    app = create_app(settings, service)
    await service.start()
    try:
        if await service.wait_loaded() != Service.READY:
            raise SystemExit("the sim service did not become ready")
        walls: list[float] = []
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for seed in range(count):
                started = time.perf_counter()
                response = await client.post("/t2i", json={
                    "prompt": "a lone request", "inference_steps": steps, "width": 512,
                    "height": 512, "seed": seed})
                walls.append(time.perf_counter() - started)
                response.raise_for_status()
        return walls
    finally:
        await service.stop()


def _bare_sleeps(step_s: float, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        time.sleep(step_s)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-ms", type=float, default=25.0)
    parser.add_argument("--step-per-image-ms", type=float, default=15.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args()
    settings = Settings(model="sim", warmup="", flush_policy="continuous",
                        sim_step_ms=args.step_ms, sim_step_per_image_ms=args.step_per_image_ms)
    walls = asyncio.run(_requests(settings, args.steps, args.requests))[2:]
    step_s = (args.step_ms + args.step_per_image_ms) / 1000
    bare = statistics.median(_bare_sleeps(step_s, args.steps) for _ in range(3))
    wall = statistics.median(walls)
    print(f"lone {args.steps}-step request: median {wall * 1000:.1f} ms "
          f"(min {min(walls) * 1000:.1f}, max {max(walls) * 1000:.1f}); bare sleeps "
          f"{bare * 1000:.1f} ms; serving adds {(wall - bare) * 1000:.1f} ms "
          f"({(wall - bare) * 1000 / args.steps:.2f} ms a step)")


if __name__ == "__main__":
    main()
