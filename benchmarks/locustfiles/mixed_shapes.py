"""Several sizes and step counts in fixed proportions: requests batch only with their own key,
so this shows what keying costs when traffic is mixed (batch sizes, per-key latency).

BENCH_SHAPES sets the mix as `WxHxSTEPS:weight,...` (default below, sized for the tiny model;
on a GPU try `512x512x20:6,512x512x30:2,768x512x20:2`).

    locust -f benchmarks/locustfiles/mixed_shapes.py --headless -u 16 -r 16 -t 120s \
        --host http://127.0.0.1:8000 --csv benchmarks/results/mixed_shapes
"""

from __future__ import annotations

import os
import random

from locust import task

from benchmarks.locustfiles.common import T2IUser

DEFAULT_SHAPES = "256x256x20:5,256x256x10:3,384x256x20:2"


def parse_shapes(text: str) -> list[tuple[tuple[int, int, int], int]]:
    shapes = []
    for part in text.split(","):
        size, _, weight = part.strip().partition(":")
        w, h, steps = (int(n) for n in size.split("x"))
        shapes.append(((w, h, steps), int(weight or 1)))
    return shapes


SHAPES = parse_shapes(os.environ.get("BENCH_SHAPES", DEFAULT_SHAPES))


class MixedUser(T2IUser):
    @task
    def generate(self) -> None:
        (w, h, steps), = random.choices([s for s, _ in SHAPES], [wt for _, wt in SHAPES])
        self.t2i(w, h, steps, name=f"/t2i {w}x{h}x{steps}")
