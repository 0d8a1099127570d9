"""Soak: a `batchserve serve --model sim` server held at saturation by Locust for a bounded time.

    python -m benchmarks.soak --duration-s 180 --out benchmarks/results/soak.json

Starts the server on a free 127.0.0.1 port (never anywhere else), samples its resident memory
from /proc once a second, runs Locust headless in a subprocess (benchmarks/locustfiles/soak.py)
with more users than the server can hold (in flight + `--max-queue`), then SIGTERMs the server
and waits for its drain. Reports failures (anything but a 200 image or a deliberate 429),
the 429 count, requests answered vs sent, the server's own counters, memory growth, and the
exit code. Exits 1 when a check fails.

`--model sim` makes a batch of n sleep `base + n * per_image` ms without using the CPU, so the
soak exercises the serving path (HTTP, batching, backpressure, encoding) for as long as asked.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serve import batchserve_cmd, server_process

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfiles" / "soak.py"
MAX_DURATION_S = 3600.0
SETTLE_S = 30.0  # after the sending ends, how long the last answers may take
MIB = 1024 * 1024


@dataclass
class Report:
    duration_s: float
    users: int
    server_args: list[str]
    sent: int = 0
    answered: int = 0
    ok_200: int = 0
    rejected_429: int = 0
    failures: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    locust: dict[str, Any] = field(default_factory=dict)
    server_counters: dict[str, float] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    server_exit_code: int | None = None
    locust_exit_code: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# -- the server ----------------------------------------------------------------------------


def http_get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    return None


class RssSampler(threading.Thread):
    """Samples the server's RSS every `interval_s` into (seconds since start, MiB) pairs."""

    def __init__(self, pid: int, interval_s: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float]] = []
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stopped.is_set():
            value = rss_mib(self.pid)
            if value is not None:
                self.samples.append((round(time.monotonic() - self.t0, 2), round(value, 2)))
            self.stopped.wait(self.interval_s)

    def stop(self) -> list[tuple[float, float]]:
        self.stopped.set()
        self.join()
        return self.samples


def scrape(url: str) -> dict[str, float]:
    """The server's own `batchserve_*` counters (labels folded into the name)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(url + "/metrics")
    wanted = ("batchserve_images_total", "batchserve_requests_rejected_total",
              "batchserve_batches_total", "batchserve_queue_depth")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                values[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return values


# -- the run -------------------------------------------------------------------------------


def run_locust(url: str, opts: argparse.Namespace, workdir: Path) -> tuple[int, dict[str, Any]]:
    summary_path = workdir / "locust-summary.json"
    env = {**os.environ, "SOAK_SUMMARY": str(summary_path), "SOAK_SEND_S": str(opts.duration_s),
           "SOAK_WIDTH": str(opts.width), "SOAK_HEIGHT": str(opts.height),
           "SOAK_STEPS": str(opts.steps)}
    # Users stop by themselves after `duration_s`, each after its last answer, and Locust quits
    # when all have. --run-time is only a backstop: when it fires, a request still unanswered
    # SETTLE_S after the end is cut off and reported as such.
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--host", url, "--users", str(opts.users), "--spawn-rate", str(opts.users),
           "--run-time", f"{round(opts.duration_s + SETTLE_S)}s", "--stop-timeout", "0",
           "--only-summary", "--loglevel", "WARNING"]
    with (workdir / "locust.log").open("wb") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=opts.duration_s + 180, check=False)
    if not summary_path.exists():
        raise RuntimeError(f"locust wrote no summary:\n{(workdir / 'locust.log').read_text()}")
    return proc.returncode, json.loads(summary_path.read_text())


def memory_figures(samples: list[tuple[float, float]], warm_s: float) -> dict[str, float]:
    if not samples:
        return {}
    warm = next((mib for t, mib in samples if t >= warm_s), samples[-1][1])
    tail = [(t, mib) for t, mib in samples if t >= warm_s] or samples
    return {
        "start": samples[0][1],
        "after_warmup": warm,
        "end": samples[-1][1],
        "max": max(mib for _, mib in samples),
        "growth_after_warmup": round(samples[-1][1] - warm, 2),
        "growth_total": round(samples[-1][1] - samples[0][1], 2),
        "slope_per_min_after_warmup": round(slope(tail) * 60, 3),
    }


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares MiB per second."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mean_t) * (m - mean_m) for t, m in points) / var


def server_args(opts: argparse.Namespace) -> list[str]:
    return ["--sim-base-ms", str(opts.sim_base_ms), "--sim-per-image-ms",
            str(opts.sim_per_image_ms), "--max-batch-size", str(opts.max_batch_size),
            "--max-wait-ms", str(opts.max_wait_ms), "--max-queue", str(opts.max_queue),
            "--refusal-hold-max", str(opts.refusal_hold_max),
            "--drain-timeout-s", "30", "--warmup", ""]


def soak(opts: argparse.Namespace, workdir: Path) -> Report:
    args = server_args(opts)
    report = Report(duration_s=opts.duration_s, users=opts.users, server_args=args)
    cmd = batchserve_cmd(["--model", "sim", *args])
    with server_process(cmd, workdir / "server.log", timeout_s=60) as (proc, url):
        sampler = RssSampler(proc.pid, opts.sample_interval_s)
        sampler.start()
        try:
            report.locust_exit_code, summary = run_locust(url, opts, workdir)
            report.server_counters = scrape(url)
        finally:
            report.rss_samples = sampler.stop()
        proc.send_signal(signal.SIGTERM)
        try:
            report.server_exit_code = proc.wait(60)
        except subprocess.TimeoutExpired:
            report.problems.append("server did not exit within 60 s of SIGTERM")
    counts = summary["counts"]
    report.sent, report.answered = counts.get("sent", 0), counts.get("answered", 0)
    report.ok_200, report.rejected_429 = counts.get("status_200", 0), counts.get("status_429", 0)
    report.failure_kinds = summary["failures"]
    report.failures = sum(report.failure_kinds.values())
    report.locust = summary["locust"]
    report.rss_mib = memory_figures(report.rss_samples, warm_s=min(30.0, opts.duration_s / 4))
    check(report, opts)
    return report


def check(report: Report, opts: argparse.Namespace) -> None:
    problems = report.problems
    counters = report.server_counters
    if report.sent == 0 or report.ok_200 == 0:
        problems.append("no successful requests")
    if report.failures:
        problems.append(f"{report.failures} failures: {report.failure_kinds}")
    if report.answered != report.sent:
        problems.append(f"answered {report.answered} of {report.sent} requests sent")
    if counters.get("batchserve_images_total") != report.ok_200:
        problems.append(f"server made {counters.get('batchserve_images_total')} images for "
                        f"{report.ok_200} 200s")
    queue_full = counters.get("batchserve_requests_rejected_total{reason=queue_full}")
    if queue_full != report.rejected_429:
        problems.append(f"server counted {queue_full} queue_full for {report.rejected_429} 429s")
    if report.server_exit_code != 0:
        problems.append(f"server exited {report.server_exit_code} after SIGTERM")
    growth = report.rss_mib.get("growth_after_warmup", 0.0)
    if opts.max_rss_growth_mib is not None and growth > opts.max_rss_growth_mib:
        problems.append(f"RSS grew {growth} MiB after warm-up (limit {opts.max_rss_growth_mib})")


def render(report: Report) -> str:
    mem = report.rss_mib
    lat = report.locust
    lines = [
        f"soak: {report.duration_s:g} s, {report.users} users, "
        f"server {' '.join(report.server_args)}",
        f"  requests sent {report.sent}, answered {report.answered}, "
        f"200 {report.ok_200}, 429 {report.rejected_429}, failures {report.failures}",
        f"  throughput {lat.get('rps')} req/s; latency p50 {lat.get('p50_ms')} ms, "
        f"p95 {lat.get('p95_ms')} ms, p99 {lat.get('p99_ms')} ms, max {lat.get('max_ms')} ms",
        f"  server: {report.server_counters}",
        f"  RSS MiB: start {mem.get('start')}, after warm-up {mem.get('after_warmup')}, "
        f"end {mem.get('end')}, max {mem.get('max')}; growth after warm-up "
        f"{mem.get('growth_after_warmup')} (slope {mem.get('slope_per_min_after_warmup')}/min)",
        f"  server exit code after SIGTERM: {report.server_exit_code}",
        "  result: " + ("PASS" if report.ok else "FAIL: " + "; ".join(report.problems)),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration-s", type=float, default=180.0, help="Locust run time")
    p.add_argument("--users", type=int, default=64,
                   help="concurrent users; keep above max-batch-size + max-queue to saturate")
    p.add_argument("--sim-base-ms", type=float, default=40.0)
    p.add_argument("--sim-per-image-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--max-queue", type=int, default=32)
    # A small waiting room: it holds some refused requests for a place (and is soaked too),
    # and more users than it holds still meet the 429 backpressure the soak checks.
    p.add_argument("--refusal-hold-max", type=int, default=4)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--sample-interval-s", type=float, default=1.0)
    p.add_argument("--max-rss-growth-mib", type=float, default=None,
                   help="fail when RSS grows more than this after warm-up (default: report only)")
    p.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    p.add_argument("--workdir", type=Path, default=None,
                   help="server and Locust logs (default: a temporary folder)")
    opts = p.parse_args(argv)
    if not 1 <= opts.duration_s <= MAX_DURATION_S:
        p.error(f"--duration-s must be 1..{MAX_DURATION_S:g}")
    if opts.users < 1:
        p.error("--users must be >= 1")
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = opts.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        report = soak(opts, workdir)
        print(render(report))
        if not report.ok:
            print(f"logs: {workdir}", file=sys.stderr)
            for name in ("server.log", "locust.log"):
                print(f"--- {name} (tail)\n" + (workdir / name).read_text()[-3000:],
                      file=sys.stderr)
    if opts.out is not None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(asdict(report) | {"ok": report.ok}, indent=2) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
