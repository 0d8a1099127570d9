"""Issue 18's benchmark: does a client that retries at once starve the engine? One server
(`tiny`, CPU), the seed-004 client shape (`locustfiles/retry.py`), 1 user then 8 users, each for
`--duration-s`, in ONE run. Reports images/s of 8 users over 1 user (target >= 0.7) and the
engine's time per image (X-Inference-Ms / X-Batch-Size, median) under load over alone (target
<= 1.15).

    PYTHONPATH=src:. python -m benchmarks.retry --duration-s 90 --out benchmarks/results/retry.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import emit_json
from benchmarks.serve import Load, batchserve_cmd, run_locust, server


def phase(records: Sequence[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    ok = [r for r in records if r["ok"]]
    per_image = [r["inference_ms"] / max(1, r["batch_size"]) for r in ok]
    return {
        "images": len(ok),
        "images_per_s": len(ok) / duration_s,
        "refused": sum(1 for r in records if r["status"] in (429, 503)),
        "timed_out": sum(1 for r in records if r["status"] == 0),
        "engine_ms_per_image": statistics.median(per_image) if per_image else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration-s", type=float, default=90.0)
    p.add_argument("--size", default="512x512x20", help="WIDTHxHEIGHTxSTEPS")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    opts = p.parse_args(argv)
    w, h, steps = (int(x) for x in opts.size.split("x"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-retry-"))
    out: dict[str, Any] = {"size": opts.size, "duration_s": opts.duration_s}
    with server(batchserve_cmd(["--model", "tiny"]), workdir / "server.log") as url:
        for users in (1, opts.users):
            load = Load("retry", users, opts.duration_s, 0.0, (w, h, steps))
            out[f"users_{users}"] = phase(
                run_locust(url, load, workdir, f"retry-{users}"), opts.duration_s)
    alone, loaded = out["users_1"], out[f"users_{opts.users}"]
    out["images_per_s_ratio"] = (loaded["images_per_s"] / alone["images_per_s"]
                                 if alone["images_per_s"] else None)
    if alone["engine_ms_per_image"] and loaded["engine_ms_per_image"]:
        out["engine_time_ratio"] = loaded["engine_ms_per_image"] / alone["engine_ms_per_image"]
    emit_json(out, opts.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
