"""`python -m benchmarks.scaleout`: does throughput scale with replicas behind nginx?

1. 1, 2 and 4 replicas of `--model sim` (a simulated GPU: a batch of n sleeps base + n x
   per-image ms, so one CPU hosts many) behind a real nginx rendered from deploy/nginx, under a
   closed-loop Locust load proportional to the replica count (`--users-per-replica`, two full
   batches per replica by default); images/s, p50/p95 and the scaling efficiency
   thr(N) / (N x thr(1)) per replica count.
2. Async jobs: one `--role api` process and 1, 2 and 4 `--role worker` processes on one Redis
   stream (results in a shared directory), under the jobs Locust scenario (submit, poll, fetch),
   users proportional to the workers; the same figures, throughput counted when images were
   ready.
3. A rolling restart under the /t2i load: SIGTERM one replica at a time, wait for it to drain
   and exit, start it again on its port, wait until it is ready, next. nginx retries what a
   draining or stopped replica did not accept, so clients should see no failure.

Results: --out/scaleout.{json,md,png}; the table is also printed. Exit status 1 when any
client saw a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.balancer import balancer, nginx_path
from benchmarks.serve import (
    HOST,
    ROOT,
    Load,
    batchserve_cmd,
    free_port,
    locust_command,
    read_records,
    redis_server,
    run_locust,
    summarize,
)

SIZE = (512, 512, 20)  # what the requests ask for; the sim engine only counts them


class Replica:
    """One `batchserve serve --model sim` process on a fixed loopback port, restartable."""

    def __init__(self, args: Sequence[str], workdir: Path, name: str) -> None:
        self.args = list(args)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def upstream(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout_s: float = 60) -> None:
        cmd = batchserve_cmd([*self.args, "--host", HOST, "--port", str(self.port)])
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited {self.proc.returncode}: {self.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica not ready in {timeout_s} s: {self.log}")
            time.sleep(0.1)  # polling an external process, bounded by the deadline

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 120) -> int:
        """SIGTERM (a graceful drain); returns the exit status."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


@contextlib.contextmanager
def fleet(n: int, args: Sequence[str], workdir: Path,
          name: str = "replica") -> Iterator[list[Replica]]:
    workdir.mkdir(parents=True, exist_ok=True)
    replicas = [Replica(args, workdir, f"{name}-{i}") for i in range(n)]
    try:
        for replica in replicas:
            replica.start()
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def engine_limit(opts: argparse.Namespace) -> float:
    """Images/s of one replica running full batches back to back."""
    batch_ms = opts.sim_base_ms + opts.sim_per_image_ms * opts.max_batch_size
    return float(opts.max_batch_size * 1000 / batch_ms)


def server_args(opts: argparse.Namespace) -> list[str]:
    return ["--model", "sim", "--sim-base-ms", str(opts.sim_base_ms),
            "--sim-per-image-ms", str(opts.sim_per_image_ms),
            "--max-batch-size", str(opts.max_batch_size), "--max-wait-ms", str(opts.max_wait_ms),
            "--drain-timeout-s", str(opts.drain_timeout_s), "--warmup", ""]


def run_point(opts: argparse.Namespace, n: int, nginx: str, workdir: Path) -> dict[str, Any]:
    users = n * opts.users_per_replica
    load = Load("saturate", users, opts.duration_s, opts.warm_s, SIZE)
    with fleet(n, server_args(opts), workdir / f"r{n}") as replicas, \
            balancer([r.upstream for r in replicas], workdir / f"r{n}" / "nginx", nginx) as lb:
        print(f"  {n} replica(s): {users} users, {opts.duration_s:g} s", flush=True)
        records = run_locust(lb.url, load, workdir, f"scaleout-r{n}")
        spread = _spread(lb.records())
    return {"replicas": n, "users": users, **summarize(records, load), "spread": spread}


def run_workers_point(opts: argparse.Namespace, n: int, workdir: Path) -> dict[str, Any]:
    """One `--role api` process and `n` `--role worker` processes on one Redis stream, the
    results in one shared directory; the jobs Locust scenario (submit, poll with backoff,
    fetch the image) against the api. Throughput counts when images were ready."""
    users = n * opts.job_users_per_worker
    load = Load("jobs", users, opts.duration_s, opts.warm_s, SIZE)
    point_dir = workdir / f"w{n}"
    point_dir.mkdir(parents=True, exist_ok=True)
    with redis_server(point_dir) as redis_url:
        shared = ["--queue", redis_url, "--results", f"file://{point_dir / 'results'}"]
        api = ["--role", "api", "--warmup", "", *shared]
        worker = [*server_args(opts), "--role", "worker", *shared]
        with fleet(1, api, point_dir, "api") as (front,), \
                fleet(n, worker, point_dir, "worker"):
            print(f"  {n} worker(s): {users} job users, {opts.duration_s:g} s", flush=True)
            records = run_locust(front.url, load, workdir, f"scaleout-w{n}")
    return {"workers": n, "users": users, **summarize(records, load)}


def run_rolling_restart(opts: argparse.Namespace, nginx: str, workdir: Path) -> dict[str, Any]:
    """Every replica restarted once, one at a time, under load; what the clients saw."""
    n = opts.restart_replicas
    users = n * opts.users_per_replica
    with fleet(n, server_args(opts), workdir / "restart") as replicas, \
            balancer([r.upstream for r in replicas], workdir / "restart" / "nginx", nginx) as lb:
        # Runs until stopped (SIGTERM: users finish the request in flight, records written).
        load = Load("saturate", users, 3600, 0.0, SIZE)
        cmd, env, record = locust_command(lb.url, load, workdir, "scaleout-restart")
        with (workdir / "scaleout-restart.locust.log").open("wb") as out:
            locust = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      cwd=ROOT)
        try:
            time.sleep(opts.warm_s)  # the load reaches every replica before the first restart
            restarts = [restart(replica, opts.restart_pause_s) for replica in replicas]
        finally:
            locust.send_signal(signal.SIGTERM)
            locust.wait(120)
        log = lb.records()
    records = read_records(record, workdir, "scaleout-restart")
    retried = [r for r in log if "," in r["upstream_status"]]
    return {
        "replicas": n, "users": users, "restarts": restarts,
        "requests": len(records), "failures": sum(not r["ok"] for r in records),
        "statuses": _count(str(r["status"]) for r in records),
        "retried_by_nginx": len(retried),
        "retried_after": _count(r["upstream_status"].split(",")[0].strip() for r in retried),
    }


def restart(replica: Replica, pause_s: float) -> dict[str, Any]:
    """SIGTERM, wait for the drain and the exit, start again, wait until ready, then wait
    `pause_s` more: nginx skips a replica for fail_timeout after it refused or answered 503."""
    began = time.monotonic()
    code = replica.stop()
    replica.start()
    down_s = round(time.monotonic() - began, 2)
    print(f"  restarted {replica.upstream}: exit {code}, ready again in {down_s} s", flush=True)
    time.sleep(pause_s)  # under load: the other replicas carry it meanwhile
    return {"replica": replica.upstream, "exit_code": code, "down_s": down_s}


def _count(values: Iterator[str] | list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _spread(log: list[dict[str, Any]]) -> dict[str, int]:
    """Requests answered by each replica (the last one nginx tried)."""
    return _count(r["upstream_addr"].split(",")[-1].strip() for r in log)


def efficiency(points: list[dict[str, Any]], key: str = "replicas") -> None:
    """thr(N) / (N x thr(1)), N = points' `key` (replicas or workers)."""
    base = next((p["images_per_s"] for p in points if p[key] == 1), None)
    for p in points:
        p["efficiency"] = round(p["images_per_s"] / (p[key] * base), 3) if base else None


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"Simulated GPU: {cfg['sim_base_ms']:g} ms + {cfg['sim_per_image_ms']:g} ms per image, "
        f"batches of {cfg['max_batch_size']} (engine limit {results['engine_limit']:.2f} "
        f"images/s per replica); {cfg['users_per_replica']} closed-loop users per replica, "
        f"{cfg['duration_s']:g} s per point ({cfg['warm_s']:g} s warm-up), nginx least_conn.",
        "",
        "| replicas | users | images/s | efficiency | p50 ms | p95 ms | mean batch | failures |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_row(p, p["replicas"]) for p in results["points"]]
    workers = results.get("workers")
    if workers:
        lines += ["", f"Async jobs: one `--role api` process and N `--role worker` processes "
                      f"(same simulated GPU) on one Redis stream, {cfg['job_users_per_worker']} "
                      f"closed-loop users per worker each submitting a job, polling it "
                      f"(0.25 s doubling to 2 s) and fetching the image.", "",
                  "| workers | users | images/s | efficiency | p50 ms (client) | p95 ms | "
                  "mean batch | failures |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [_row(p, p["workers"]) for p in workers]
    restart = results.get("rolling_restart")
    if restart:
        lines += ["", f"Rolling restart of {restart['replicas']} replicas under "
                      f"{restart['users']} users: {restart['requests']} requests, "
                      f"**{restart['failures']} failed**, statuses {restart['statuses']}; nginx "
                      f"retried {restart['retried_by_nginx']} on another replica "
                      f"(first answer: {restart['retried_after']})."]
    return "\n".join(lines) + "\n"


def _row(p: dict[str, Any], count: int) -> str:
    """One table row of a measured point: `count` replicas or workers."""
    eff = f"{p['efficiency'] * 100:.1f}%" if p.get("efficiency") is not None else "-"
    return (f"| {count} | {p['users']} | {p['images_per_s']:.2f} | {eff} | {p['p50_ms']:.0f} | "
            f"{p['p95_ms']:.0f} | {p['mean_batch_size']:.2f} | {p['failures']} |")


def chart(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = results["points"]
    ns = [p["replicas"] for p in points]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(ns, [p["images_per_s"] for p in points], marker="o", label="/t2i: replicas")
    workers = results.get("workers") or []
    if workers:
        ax_t.plot([p["workers"] for p in workers], [p["images_per_s"] for p in workers],
                  marker="s", label="async jobs: workers")
    base = next((p["images_per_s"] for p in points if p["replicas"] == 1), None)
    if base:
        ax_t.plot(ns, [n * base for n in ns], linestyle=":", color="grey",
                  label="linear (N x 1 replica)")
    ax_t.plot(ns, [n * results["engine_limit"] for n in ns], linestyle="--", color="grey",
              label="engine limit")
    for p in points:
        if p.get("efficiency") is not None:
            ax_t.annotate(f"{p['efficiency'] * 100:.0f}%", (p["replicas"], p["images_per_s"]),
                          textcoords="offset points", xytext=(6, -12), fontsize=8)
    ax_l.plot(ns, [p["p50_ms"] / 1000 for p in points], marker="o", label="/t2i p50")
    ax_l.plot(ns, [p["p95_ms"] / 1000 for p in points], marker="o", label="/t2i p95")
    if workers:
        ax_l.plot([p["workers"] for p in workers], [p["p50_ms"] / 1000 for p in workers],
                  marker="s", label="jobs p50 (polling included)")
    ax_t.set(title="throughput", xlabel="replicas (or workers)", ylabel="images / s")
    ax_l.set(title="latency", xlabel="replicas (or workers)", ylabel="seconds")
    for ax in (ax_t, ax_l):
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    ax_t.legend(fontsize=8, loc="upper left")
    ax_l.legend(fontsize=8, loc="lower right")
    cfg = results["config"]
    fig.suptitle(f"replicas behind nginx: simulated GPU {cfg['sim_base_ms']:g} + "
                 f"{cfg['sim_per_image_ms']:g} ms/image, {cfg['users_per_replica']} users "
                 f"per replica")
    fig.tight_layout()
    fig.savefig(out / "scaleout.png", dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaleout",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--replicas", default="1,2,4", help="replica counts to measure")
    p.add_argument("--users-per-replica", type=int, default=16,
                   help="closed-loop users per replica (16 = two full batches of 8)")
    p.add_argument("--sim-base-ms", type=float, default=250.0,
                   help="fixed ms per batch (SD 1.5, 512x512, 20 steps on an H100-class GPU)")
    p.add_argument("--sim-per-image-ms", type=float, default=150.0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=500.0)
    p.add_argument("--drain-timeout-s", type=float, default=60.0)
    p.add_argument("--duration-s", type=float, default=45.0, help="Locust time per point")
    p.add_argument("--warm-s", type=float, default=8.0,
                   help="requests started this soon after the first are not measured")
    p.add_argument("--restart-replicas", type=int, default=4,
                   help="replicas in the rolling restart (0: skip it)")
    p.add_argument("--restart-pause-s", type=float, default=5.0,
                   help="wait after a replica is ready again (2 x nginx fail_timeout)")
    p.add_argument("--workers", default=None,
                   help="worker counts for the async-jobs part (default 1,2,4; --quick 1,2; "
                        "'': skip it)")
    p.add_argument("--job-users-per-worker", type=int, default=32,
                   help="job users per worker (more than /t2i: each also spends time polling)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 and 2 replicas, short")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    opts = p.parse_args(argv)
    if opts.quick:
        opts.replicas, opts.duration_s, opts.warm_s = "1,2", 3.0, 0.5
        opts.users_per_replica, opts.max_batch_size, opts.max_wait_ms = 4, 2, 50.0
        opts.sim_base_ms, opts.sim_per_image_ms, opts.restart_pause_s = 50.0, 25.0, 4.0
        opts.restart_replicas, opts.job_users_per_worker = 2, 8
    if opts.workers is None:
        opts.workers = "1,2" if opts.quick else "1,2,4"
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    nginx = nginx_path()
    if nginx is None:
        raise SystemExit("nginx not found (apt: nginx; ./dev.sh test installs it)")
    out: Path = opts.out
    workdir = out / "runs" / "scaleout"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    points = [run_point(opts, n, nginx, workdir) for n in _ints(opts.replicas)]
    efficiency(points)
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "load_avg_at_start": _load()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "engine_limit": round(engine_limit(opts), 3),
        "points": points,
    }
    if opts.workers:
        print("async jobs: api + workers on one Redis stream", flush=True)
        results["workers"] = [run_workers_point(opts, n, workdir) for n in _ints(opts.workers)]
        efficiency(results["workers"], "workers")
    if opts.restart_replicas:
        print("rolling restart", flush=True)
        results["rolling_restart"] = run_rolling_restart(opts, nginx, workdir)
    results["machine"]["load_avg_at_end"] = _load()
    results["elapsed_s"] = round(time.time() - started, 1)
    name = "scaleout-quick" if opts.quick else "scaleout"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / f"{name}.md").write_text(table)
    if not opts.quick:
        chart(results, out)
    print(table)
    failures = sum(p["failures"] for p in points + results.get("workers", []))
    failures += results.get("rolling_restart", {}).get("failures", 0)
    return 1 if failures else 0


def _ints(text: str) -> list[int]:
    return [int(n) for n in text.split(",") if n]


def _load() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    raise SystemExit(main())
