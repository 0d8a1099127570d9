"""Servers and load for the runner: a server subprocess on a free loopback port, one Locust run
in a subprocess (never in this process: Locust monkey-patches with gevent), and the figures
one run gives."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILES = ROOT / "benchmarks" / "locustfiles"
HOST = "127.0.0.1"  # load goes to loopback only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def server(cmd: Sequence[str], log_path: Path, timeout_s: float = 600) -> Iterator[str]:
    """`server_process`, for callers that only need the URL."""
    with server_process(cmd, log_path, timeout_s) as (_, url):
        yield url


@contextlib.contextmanager
def server_process(cmd: Sequence[str], log_path: Path,
                   timeout_s: float = 600) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Runs `cmd` (which must take `--host`/`--port` last) until /readyz answers; yields the
    process and its URL; SIGTERMs it (a graceful drain) on the way out if still running."""
    port = free_port()
    full = [*cmd, "--host", HOST, "--port", str(port)]
    url = f"http://{HOST}:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            deadline = time.monotonic() + timeout_s
            while not _ready(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"{full[:4]} exited {proc.returncode}:\n"
                                       + log_path.read_text()[-3000:])
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server not ready in {timeout_s} s: {log_path}")
                time.sleep(0.2)
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def batchserve_cmd(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "batchserve", "serve", "--log-level", "warning", *args]


def bare_cmd(app: str = "app") -> list[str]:
    return [sys.executable, "-m", "uvicorn", f"benchmarks.bare:{app}", "--loop", "uvloop",
            "--http", "httptools", "--no-access-log", "--log-level", "warning"]


@dataclass(frozen=True)
class Load:
    scenario: str  # a file in benchmarks/locustfiles, without .py
    users: int
    duration_s: float
    warm_s: float  # requests started this long after the first one are not measured
    size: tuple[int, int, int]
    env: tuple[tuple[str, str], ...] = ()  # more variables for the scenario


def run_locust(url: str, load: Load, workdir: Path, name: str) -> list[dict[str, Any]]:
    """One headless Locust run; returns its per-request records."""
    cmd, env, record = locust_command(url, load, workdir, name)
    with (workdir / f"{name}.locust.log").open("wb") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                       timeout=load.duration_s + 1200, check=False)
    return read_records(record, workdir, name)


def locust_command(url: str, load: Load, workdir: Path,
                   name: str) -> tuple[list[str], dict[str, str], Path]:
    """The command line and environment of one headless Locust run, and where its records go
    (written when Locust quits: at the end of `load.duration_s`, or on SIGTERM)."""
    record = workdir / f"{name}.records.json"
    w, h, steps = load.size
    env = {**os.environ, "BENCH_RECORD": str(record), "BENCH_WIDTH": str(w),
           "BENCH_HEIGHT": str(h), "BENCH_STEPS": str(steps), **dict(load.env)}
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILES / f"{load.scenario}.py"),
           "--headless", "--host", url, "-u", str(load.users), "-r", str(load.users),
           "-t", f"{math.ceil(load.duration_s)}s", "--stop-timeout", "900",
           "--csv", str(workdir / name), "--only-summary", "--loglevel", "WARNING"]
    return cmd, env, record


def read_records(record: Path, workdir: Path, name: str) -> list[dict[str, Any]]:
    if not record.exists():
        raise RuntimeError(f"Locust wrote no records; see {workdir / name}.locust.log")
    records: list[dict[str, Any]] = json.loads(record.read_text())
    return records


def median_s(run: Callable[[], Any], repeats: int) -> float:
    """The median wall time of `repeats` calls of `run`, in seconds (in-process arms)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def throughput(ends: Sequence[float], gap_s: float = 0.15) -> float:
    """Completions per second, counted between batch boundaries.

    A batch's images arrive together, so completions come in clumps; counting from the end of
    the first clump to the end of the last one (and only the clumps in between) measures whole
    batch periods. A steady stream (one clump) falls back to completions over its span.
    """
    ordered = sorted(ends)
    if len(ordered) < 2:
        return 0.0
    clumps = [[ordered[0]]]
    for t in ordered[1:]:
        if t - clumps[-1][-1] > gap_s:
            clumps.append([t])
        else:
            clumps[-1].append(t)
    if len(clumps) >= 3:
        span = clumps[-1][-1] - clumps[0][-1]
        return sum(len(c) for c in clumps[1:]) / span
    span = ordered[-1] - ordered[0]
    return (len(ordered) - 1) / span if span > 0 else 0.0


def summarize(records: Sequence[dict[str, Any]], load: Load) -> dict[str, Any]:
    """The figures of one run, over requests started after the warm-up."""
    if not records:
        return {"requests": 0, "failures": 0}
    t0 = min(r["start"] for r in records)
    measured = [r for r in records if t0 + load.warm_s <= r["start"] <= t0 + load.duration_s]
    ok = [r for r in measured if r["ok"]]
    latencies = [(r["end"] - r["start"]) * 1000 for r in ok]
    batches = sum(1 / r["batch_size"] for r in ok if r["batch_size"] > 0)
    # Async jobs: the image is ready at `done` (the job's completed_at), whenever the client's
    # next poll comes; throughput counts readiness, latency what the client waited.
    ready = [r.get("done", r["end"]) for r in ok]
    extra: dict[str, float] = {}
    if any("done" in r for r in ok):
        extra["p50_ready_ms"] = round(percentile(
            [(r["done"] - r["start"]) * 1000 for r in ok if "done" in r], 0.50), 1)
    return {
        "requests": len(records),
        "failures": sum(not r["ok"] for r in records),
        "measured": len(ok),
        "images_per_s": round(throughput(ready), 4),
        "p50_ms": round(percentile(latencies, 0.50), 1),
        "p95_ms": round(percentile(latencies, 0.95), 1),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "mean_batch_size": round(len(ok) / batches, 2) if batches else 0.0,
        "mean_queue_ms": round(sum(r["queue_ms"] for r in ok) / len(ok), 1) if ok else 0.0,
        **extra,
    }


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (AOF on, fsync every second: Redis's
    production default); yields its URL."""
    port = free_port()
    data = workdir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", HOST, "--dir", str(data),
           "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"]
    with (data / "redis.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while "Ready to accept connections" not in (data / "redis.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {data / 'redis.log'}")
            time.sleep(0.05)
        yield f"redis://{HOST}:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
