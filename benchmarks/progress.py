"""Issue 22: what progress costs. The `tiny` engine's whole batch, timed three ways in one run:
no step callback (as before progress existed), the service's step reporting with nobody
listening (`ProgressBoard.batch_stepped`, what the service calls: one board write per keyed
item and one for the batch, per step), and with listeners and a preview made at every step
(`--preview-every 1`, the most expensive setting). Reports ms per step, the callback alone and
the preview's own cost per image.

    PYTHONPATH=src:. python -m benchmarks.progress --out benchmarks/results/progress.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from batchserve.engines import GenerationItem
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.engines.preview import latent_preview
from batchserve.progress import ProgressBoard
from batchserve.settings import Settings
from benchmarks.report import emit_json
from benchmarks.serve import median_s


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="128x128x20", help="WIDTHxHEIGHTxSTEPS")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    opts = p.parse_args(argv)
    w, h, steps = (int(x) for x in opts.size.split("x"))
    engine = DiffusionEngine.load(Settings(model="tiny", warmup=""))
    items = [GenerationItem("a lighthouse at dusk", "", i, w, h, steps, 7.5, engine.sampler)
             for i in range(opts.batch)]
    keys = [f"job-{i}" for i in range(opts.batch)]
    engine.generate(items[:1])  # first-call costs out of the way
    quiet = ProgressBoard(preview_every=5)
    watched = ProgressBoard(preview_every=1)
    arms = {
        "no_callback": partial(engine.generate, items),
        "reported_nobody_listens": partial(engine.generate, items,
                                           on_step=partial(quiet.batch_stepped, keys)),
    }
    with watched.listen(keys[0]), watched.listen(keys[1]), watched.listen(keys[2]), \
            watched.listen(keys[3]):
        arms["listened_preview_every_step"] = partial(engine.generate, items,
                                                      on_step=partial(watched.batch_stepped, keys))
        seconds = {name: median_s(run, opts.repeats) for name, run in arms.items()}
    import torch

    latents = torch.randn(4, h // 8, w // 8)
    preview_ms = median_s(lambda: latent_preview(latents, "sd1"), 50) * 1000
    big = torch.randn(4, 128, 128)  # SDXL 1024x1024's latent grid
    preview_1024_ms = median_s(lambda: latent_preview(big, "sdxl"), 20) * 1000
    # The callback alone, nobody listening: what every step of every batch pays.
    call = partial(ProgressBoard(preview_every=5).batch_stepped, keys)
    calls = 20000
    started = time.perf_counter()
    for n in range(calls):
        call(n % steps + 1, steps, None)
    callback_us = (time.perf_counter() - started) / calls * 1e6
    base = seconds["no_callback"]
    out: dict[str, Any] = {
        "model": "tiny", "size": opts.size, "batch": opts.batch, "repeats": opts.repeats,
        "ms_per_step": {k: v * 1000 / steps for k, v in seconds.items()},
        "ratio_to_no_callback": {k: v / base for k, v in seconds.items()},
        "preview_ms_per_image": preview_ms,
        "preview_ms_per_image_1024": preview_1024_ms,
        "callback_us_per_step_nobody_listens": callback_us,
    }
    emit_json(out, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
