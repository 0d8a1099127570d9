"""The benchmark tooling works: its arithmetic, the sd15 preset's architecture, and a smoke run
of the runner and of every Locust scenario in subprocesses (Locust never runs in pytest).
Speed itself is measured by `python -m benchmarks`, never asserted here."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import openloop, openloop_report, report, saturation
from benchmarks.serve import Load, batchserve_cmd, percentile, server, summarize, throughput

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("single_user", "saturate", "mixed_shapes", "ramp", "burst", "impatient")


def test_throughput_counts_whole_batch_periods() -> None:
    # batches of 4 finish every 2 s; the first clump only opens the window
    ends = [t + j * 0.01 for t in (10.0, 12.0, 14.0, 16.0) for j in range(4)]
    assert throughput(ends) == pytest.approx(12 / (16.03 - 10.03))
    # a steady stream: completions over the span
    assert throughput([0.0, 0.1, 0.2, 0.3]) == pytest.approx(10.0)
    assert throughput([1.0]) == 0.0


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == pytest.approx(50.5)
    assert percentile(values, 0.99) == pytest.approx(99.01)
    assert percentile([3.0], 0.95) == 3.0


def _record(start: float, end: float, batch: int, ok: bool = True) -> dict[str, Any]:
    return {"start": start, "end": end, "status": 200 if ok else 500, "ok": ok,
            "key": "256x256x20", "batch_size": batch, "queue_ms": 5.0, "inference_ms": 900.0}


def test_summarize_skips_warmup_and_counts_failures() -> None:
    load = Load("saturate", 2, duration_s=10, warm_s=2, size=(256, 256, 20))
    records = [_record(0.0, 5.0, 1)]  # started in the warm-up: not measured
    records += [_record(s, s + 1.0, 2) for s in (2.0, 2.0, 4.0, 4.0, 6.0, 6.0)]
    records += [_record(7.0, 7.5, 1, ok=False)]
    figures = summarize(records, load)
    assert figures["requests"] == 8 and figures["failures"] == 1
    assert figures["measured"] == 6
    assert figures["p50_ms"] == pytest.approx(1000.0)
    assert figures["mean_batch_size"] == pytest.approx(2.0)
    assert figures["images_per_s"] == pytest.approx(4 / 4.0)


def _results(batched: float, unbatched: float, null_rps: float) -> dict[str, Any]:
    def point(part: str, arm: str, users: int, ips: float, p50: float) -> dict[str, Any]:
        return {"part": part, "arm": arm, "users": users, "images_per_s": ips, "p50_ms": p50,
                "p95_ms": p50, "p99_ms": p50, "mean_batch_size": 1.0, "failures": 0}

    return {
        "config": {"max_batch_size": 8, "max_wait_ms": 500.0, "overhead_users": 32},
        "raw": {"batches": {"1": {"median_s": 2.0, "images_per_s": 0.5},
                            "8": {"median_s": 8.0, "images_per_s": 1.0}}},
        "points": [
            point("served", "batched", 1, 0.4, 2540.0),
            point("served", "eager", 1, 0.5, 2040.0),
            point("served", "batched", 16, batched, 9000.0),
            point("served", "unbatched", 16, unbatched, 9000.0),
            point("overhead", "bare", 32, 1000.0, 1.0),
            point("overhead", "null", 32, null_rps, 1.0),
        ],
    }


def test_targets_met_and_missed() -> None:
    met = {t["target"]: t["met"] for t in report.targets(_results(0.95, 0.5, 600.0))}
    assert met == {
        "served batched at 16 users / raw batch 8": True,
        "served batched / unbatched at 16 users": True,
        "1 user p50, deadline policy": True,
        "1 user p50, eager policy": False,  # 2040 > 2000 + 30
        "null engine / bare Starlette requests/s": True,
    }
    missed = {t["target"]: t["met"] for t in report.targets(_results(0.85, 0.6, 400.0))}
    assert not any(missed[k] for k in missed if "p50" not in k)


def test_sd15_has_the_sd15_architecture() -> None:
    """Built on the meta device: the real shapes, no memory, no download."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from batchserve.engines import sd15

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd15.UNET_CONFIG)
        vae = AutoencoderKL(**sd15.VAE_CONFIG)
        text = CLIPTextModel(sd15.text_config(bos_token_id=512, eos_token_id=513))

    def params(m: torch.nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    assert params(unet) == pytest.approx(859.52, abs=0.01)
    assert params(vae) == pytest.approx(83.65, abs=0.01)
    assert params(text) == pytest.approx(123.06, abs=0.01)
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8


def test_sd15_pipeline_assembles(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--model sd15` builds a full pipeline (weights on the meta device: no 4 GiB here)."""
    import torch

    from batchserve.engines import sd15

    def on_meta(cls: Any) -> Any:
        def build(*args: Any, **kwargs: Any) -> Any:
            with torch.device("meta"):
                return cls(*args, **kwargs)

        return build

    for name in ("UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel"):
        monkeypatch.setattr(sd15, name, on_meta(getattr(sd15, name)))
    pipe = sd15.build_pipeline()
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.block_out_channels == (320, 640, 1280, 1280)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_raw_measures_the_engine() -> None:
    from batchserve.settings import Settings
    from benchmarks.raw import measure

    result = measure(Settings(model="tiny", warmup=""), (64, 64, 1), [1, 2], repeats=1)
    assert set(result["batches"]) == {"1", "2"}
    for run in result["batches"].values():
        assert run["median_s"] > 0 and run["images_per_s"] > 0


@pytest.fixture(scope="module")
def sim_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("sim") / "server.log"
    cmd = batchserve_cmd(["--model", "sim", "--sim-base-ms", "20", "--sim-per-image-ms", "5",
                          "--max-wait-ms", "50", "--warmup", ""])
    with server(cmd, log) as url:
        yield url


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_runs_headless(scenario: str, sim_server: str, tmp_path: Path) -> None:
    record = tmp_path / "records.json"
    env = {**os.environ, "BENCH_RECORD": str(record), "BENCH_WIDTH": "64",
           "BENCH_HEIGHT": "64", "BENCH_STEPS": "1", "BENCH_SHAPES": "64x64x1:2,64x128x1:1",
           "RAMP_RATE": "20", "BURST_STAGE_S": "0.7", "BURST_PEAK": "6"}
    cmd = [sys.executable, "-m", "locust", "-f", f"benchmarks/locustfiles/{scenario}.py",
           "--headless", "--host", sim_server, "-u", "3", "-r", "3", "-t", "2s",
           "--stop-timeout", "30", "--csv", str(tmp_path / "run"), "--only-summary"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(record.read_text())
    assert records and all(r["ok"] and r["status"] == 200 for r in records)
    assert all(r["batch_size"] >= 1 for r in records)
    stats = (tmp_path / "run_stats.csv").read_text()
    assert "/t2i" in stats
    if scenario == "mixed_shapes":
        assert {r["key"] for r in records} == {"64x64x1", "64x128x1"}


def test_jobs_scenario_submits_polls_and_checks(sim_server: str, tmp_path: Path) -> None:
    record = tmp_path / "records.json"
    env = {**os.environ, "BENCH_RECORD": str(record), "BENCH_WIDTH": "64",
           "BENCH_HEIGHT": "64", "BENCH_STEPS": "1"}
    cmd = [sys.executable, "-m", "locust", "-f", "benchmarks/locustfiles/jobs.py",
           "--headless", "--host", sim_server, "-u", "3", "-r", "3", "-t", "2s",
           "--stop-timeout", "30", "--csv", str(tmp_path / "run"), "--only-summary"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(record.read_text())
    assert records and all(r["ok"] and r["status"] == 200 for r in records)
    # the image was ready (completed_at) before the client's poll saw it and fetched it
    assert all(r["start"] < r["done"] <= r["end"] + 0.01 and r["polls"] >= 1 for r in records)
    stats = (tmp_path / "run_stats.csv").read_text()
    assert "/v1/jobs/{id}/image" in stats and "/v1/jobs/{id}" in stats


def test_poll_gap_follows_the_backoff() -> None:
    # polls at 250, 750, 1750, 3750, 5750 ms after submitting
    assert report.poll_gap_ms(100) == 250
    assert report.poll_gap_ms(600) == 500
    assert report.poll_gap_ms(1000) == 1000
    assert report.poll_gap_ms(9000) == 2000


def test_job_targets() -> None:
    def point(arm: str, users: int, ips: float, p50: float, ready: float | None) -> dict[str, Any]:
        p = {"part": "jobs", "arm": arm, "users": users, "images_per_s": ips, "p50_ms": p50}
        return p if ready is None else {**p, "p50_ready_ms": ready}

    results = {"config": {"max_batch_size": 8, "overhead_users": 32}, "points": [
        point("t2i", 1, 4.0, 200.0, None), point("t2i", 32, 30.0, 900.0, None),
        point("jobs-memory", 1, 3.9, 260.0, 205.0), point("jobs-memory", 32, 28.0, 1500.0, 950),
        point("jobs-redis", 1, 3.8, 600.0, 290.0), point("jobs-redis", 32, 25.0, 1600.0, 990),
    ]}
    met = {t["target"]: (t["met"], t["bound"]) for t in report.targets(results)}
    assert met == {
        "jobs (memory) / t2i images/s at 32 users": (True, 0.9),
        "jobs (memory) 1 user p50 overhead, polling included": (True, 300.0),
        "jobs (memory) 1 user p50 overhead to image ready": (True, 50.0),
        "jobs (redis) / t2i images/s at 32 users": (False, 0.9),
        "jobs (redis) 1 user p50 overhead, polling included": (False, 300.0),
        "jobs (redis) 1 user p50 overhead to image ready": (False, 50.0),
    }


def run_quick(tmp_path: Path, only: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    """`python -m benchmarks --quick --only ONLY` in a subprocess (Locust never runs in the
    pytest process); returns the finished process and its bench.json."""
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--only", only, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, json.loads((tmp_path / "bench.json").read_text())


def test_runner_quick_smoke(tmp_path: Path) -> None:
    """The runner end to end on the sim engine: every output file, no failed request."""
    proc, results = run_quick(tmp_path, "overhead,sim-gpu")
    parts = {(p["part"], p["arm"]) for p in results["points"]}
    assert parts == {("overhead", "bare"), ("overhead", "bare-encoding"), ("overhead", "null"),
                     ("sim-gpu", "batched")}
    assert all(p["failures"] == 0 and p["images_per_s"] > 0 for p in results["points"])
    assert "null engine / bare Starlette" in proc.stdout
    for name in ("bench.csv", "bench.md", "sim_gpu.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "sim_gpu.png").read_bytes().startswith(b"\x89PNG")


def test_poisson_schedule_is_bounded_in_count_and_time() -> None:
    times = openloop.schedule(rate=50.0, count=10_000, duration_s=20.0, seed=3)
    assert times == sorted(times) and times[-1] <= 20.0
    assert 900 <= len(times) <= 1100  # about rate x duration
    assert len(openloop.schedule(rate=50.0, count=7, duration_s=20.0, seed=3)) == 7
    # A100 replay: 8 images of 20 steps in 20 x (25 + 8 x 15) ms
    assert openloop.capacity("one-key", 25.0, 15.0) == pytest.approx(8 / 2.9)


def test_openloop_interval_pairs_requests_by_schedule() -> None:
    """The bootstrap interval of a latency ratio: exact when one policy is a scaled copy of the
    other, around the measured ratio otherwise, and only over requests both measured."""
    rng = random.Random(5)
    base = [rng.expovariate(1.0) * 1000 for _ in range(400)]
    low, high = openloop_report.interval([x * 0.5 for x in base], base, 0.5)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)
    noisy = [x * rng.uniform(0.3, 0.9) for x in base]
    measured = percentile(noisy, 0.95) / percentile(base, 0.95)
    low, high = openloop_report.interval(noisy, base, 0.95)
    assert low < measured < high and high - low < 0.5
    # a request one policy did not measure (warm-up, failure) is left out of both sides
    gaps = [None if i % 2 else x for i, x in enumerate(base)]
    low, high = openloop_report.interval(gaps, [x * 4 for x in base], 0.5)
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)
    assert openloop_report.interval([1.0, None], [1.0, 2.0], 0.5) is None  # too few to tell


def test_openloop_quick_smoke(tmp_path: Path) -> None:
    """The open-loop run end to end: three sim servers, one schedule, every output file."""
    cmd = [sys.executable, "-m", "benchmarks.openloop", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "openloop.json").read_text())
    (point,) = results["points"]
    assert set(point["policies"]) == {"deadline", "eager", "continuous"}
    for figures in point["policies"].values():
        assert figures["failures"] == 0 and figures["measured"] > 0
    assert all(len(f["lat_ms"]) == len(point["policies"]["continuous"]["lat_ms"])
               for f in point["policies"].values())
    report = (tmp_path / "openloop.md").read_text()
    assert "continuous p50 / deadline p50" in report and "ideal model" in report
    assert (tmp_path / "openloop.png").read_bytes().startswith(b"\x89PNG")


def test_saturation_quick_smoke(tmp_path: Path) -> None:
    """Alternating saturation windows end to end on two sim servers: every round has a window
    of each policy, in reversed order every other round, and the ratio is the rounds' sums'."""
    cmd = [sys.executable, "-m", "benchmarks.saturation", "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "saturation.json").read_text())
    assert [r["order"] for r in results["rounds"]] == [["deadline", "continuous"],
                                                      ["continuous", "deadline"]]
    rates = [{p: w["images_per_s"] for p, w in r["windows"].items()} for r in results["rounds"]]
    assert all(rate > 0 for r in rates for rate in r.values()) and results["failed"] == 0
    figures = results["ratios"]["continuous"]
    assert figures["ratio"] == pytest.approx(
        sum(r["continuous"] for r in rates) / sum(r["deadline"] for r in rates), abs=1e-3)
    low, high = figures["interval"]
    assert low <= figures["ratio"] <= high
    assert "continuous / deadline images/s over all rounds" in (tmp_path / "saturation.md"
                                                                ).read_text()
    assert (tmp_path / "saturation.png").read_bytes().startswith(b"\x89PNG")


def test_saturation_interval_resamples_rounds() -> None:
    steady = [{"a": 10.0, "b": 9.0}] * 6
    assert saturation.interval(steady, "b", "a", seed=1) == pytest.approx((0.9, 0.9))
    noisy = [{"a": 10.0, "b": b} for b in (8.0, 10.0, 9.0, 11.0, 7.0, 9.0)]
    low, high = saturation.interval(noisy, "b", "a", seed=1)
    assert low < 0.9 < high


def test_runner_goodput_smoke(tmp_path: Path) -> None:
    """The impatient-clients comparison end to end on the sim engine (figures mean nothing)."""
    _, results = run_quick(tmp_path, "goodput")
    parts = {(p["part"], p["arm"]) for p in results["points"]}
    assert parts == {("goodput", "batch1"), ("goodput", "unbatched"), ("goodput", "batched"),
                     ("goodput", "adaptive"), ("patient", "batched"), ("patient", "adaptive")}
    for point in results["points"]:
        if point["part"] == "goodput" and point["arm"] != "batch1":
            assert point["requests"] > 0 and point["generated"] >= point["wasted"] >= 0
        else:  # a second or two of load on a busy CI machine: answers, not rates
            assert point["failures"] == 0 and point["requests"] > 0
    table = (tmp_path / "bench.md").read_text()
    assert "Impatient clients" in table and "adaptive wasted / generated" in table


def test_lone_step_reports_serving_overhead() -> None:
    """Lone continuous requests on an in-process sim service, 1 ms steps: a line with the
    request's median wall time above its bare sleeps."""
    cmd = [sys.executable, "-m", "benchmarks.lone_step", "--step-ms", "1",
           "--step-per-image-ms", "0", "--steps", "3", "--requests", "4"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"median ([\d.]+) ms .*bare sleeps ([\d.]+) ms", proc.stdout)
    assert match is not None, proc.stdout
    assert float(match[1]) > float(match[2]) >= 3.0  # 3 sleeps of 1 ms, plus serving


def test_openloop_img2img_mix_sends_half_image_requests_that_run_fewer_steps() -> None:
    """The images mix: about half the bodies carry an init image at a strength in 0.3-0.9, and
    the capacity counts the steps they run (`int(20 * strength)`), not 20."""
    sent = openloop.bodies("img2img", 400, 64, seed=1)
    edits = [b for b in sent if "init_image" in b]
    assert 150 < len(edits) < 250
    assert all(0.3 <= b["strength"] <= 0.9 for b in edits)
    assert {openloop.steps_run(b) for b in edits} <= set(range(6, 19))
    assert all(openloop.steps_run(b) == 20 for b in sent if "init_image" not in b)
    assert openloop.bodies("mixed", 50, 64, seed=1) == openloop.bodies("mixed", 50, 64, seed=1)
    assert openloop.capacity("img2img", 25.0, 15.0) > openloop.capacity("one-key", 25.0, 15.0)
    keys = openloop.ideal_keys("img2img")
    assert 0.4 < sum(k == (20, 7.5) for k in keys) / len(keys) < 0.6


def test_ideal_bounds_floor_and_shortest_first() -> None:
    """Shortest-first runs the item with the fewest steps left first and lets a newcomer with
    fewer take over at the next step; no latency is below the item's steps alone, so the floor
    is below every schedule's p50."""
    from benchmarks import ideal

    # (arrival s, (steps, guidance)); a step of n items costs 100 + 900 n ms
    arr = [(0.0, (3, 7.5)), (0.0, (1, 7.5)), (1.5, (1, 7.5))]
    assert ideal.shortest_first(arr, 100.0, 900.0, cap=1) == pytest.approx([5.0, 1.0, 1.5])
    # two at a time: steps of two cost 1.9 s; the newcomer shares the long item's second step
    assert ideal.shortest_first(arr, 100.0, 900.0, cap=2) == pytest.approx([4.8, 1.9, 2.3])
    many = ideal.arrivals(0.5, openloop.ideal_keys("mixed"), 300, seed=3)
    alone = [key[0] * 1.0 for _, key in many]
    for cap in (1, 4):
        lat = ideal.shortest_first(many, 100.0, 900.0, cap)
        assert all(x >= a - 1e-9 for x, a in zip(lat, alone, strict=True))
    seen = ideal.bounds(many, 100.0, 900.0)
    assert seen["floor"] <= min(seen["continuous"], seen["best shortest-first"])
    assert seen["its cap"] in (1.0, 2.0, 4.0, 8.0)


def test_retry_benchmark_phase_counts_images_refusals_and_engine_time() -> None:
    from benchmarks.retry import phase

    records = [
        {"ok": True, "status": 200, "inference_ms": 1000.0, "batch_size": 2},
        {"ok": True, "status": 200, "inference_ms": 600.0, "batch_size": 1},
        {"ok": False, "status": 503, "inference_ms": 0.0, "batch_size": 0},
        {"ok": False, "status": 0, "inference_ms": 0.0, "batch_size": 0},
    ]
    figures = phase(records, 10.0)
    assert figures == {"images": 2, "images_per_s": 0.2, "refused": 1, "timed_out": 1,
                       "engine_ms_per_image": 550.0}
