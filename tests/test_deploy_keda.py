"""The KEDA triggers work: their queries, run against a real Prometheus that scrapes real
replicas with deploy/k8s/prometheus-scrape.yml's relabelling, return the number the
ScaledObject expects.

Two `--model sim` replicas stand in for two pods. Debian's Prometheus has no Kubernetes
discovery, so each replica is a static target carrying the `__meta_kubernetes_*` labels that
discovery would give a pod; the job's own relabel rules turn them into `namespace`, `pod` and
`component`. A batch takes a minute and a group only flushes when full, so after 10 requests to
one replica and 11 to the other exactly 6 + 7 wait: the queue-depth trigger must read 13, and
the HPA then wants ceil(13 / 8) = 2 replicas. The workers' triggers are checked the same way
against a `--role api` process on a real Redis, then a `--role worker` joining it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from test_prometheus_scrape import poll, stop

from conftest import ServerProcess, free_port, require_tool, running_server

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BATCH = 4
SENT = {"batchserve-t2i-a": 10, "batchserve-t2i-b": 11}  # pod name -> requests sent
WAITING = sum(n - BATCH for n in SENT.values())  # one full batch each runs, the rest wait


def triggers(path: Path) -> dict[str, dict[str, Any]]:
    (scaled,) = [o for o in yaml.safe_load_all(path.read_text()) if o["kind"] == "ScaledObject"]
    return {t["name"]: t["metadata"] for t in scaled["spec"]["triggers"]}


def pod_target(server: ServerProcess, pod: str, component: str) -> dict[str, Any]:
    """A static target labelled as Kubernetes pod discovery would label the pod."""
    return {"targets": [f"127.0.0.1:{server.port}"], "labels": {
        "__meta_kubernetes_namespace": "batchserve",
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "batchserve",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_container_port_name": "http",
    }}


def queue_depth(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "batchserve_queue_depth")


@dataclasses.dataclass
class Prometheus:
    url: str
    config: Path
    proc: subprocess.Popen[bytes]

    def retarget(self, targets: list[dict[str, Any]]) -> None:
        """New static targets, applied by a reload (SIGHUP), as discovery would add a pod."""
        self.config.write_text(yaml.safe_dump(scrape_config(targets)))
        self.proc.send_signal(signal.SIGHUP)


def scrape_config(targets: list[dict[str, Any]]) -> dict[str, Any]:
    """deploy/k8s/prometheus-scrape.yml with static targets for pod discovery, every second."""
    config: dict[str, Any] = yaml.safe_load((K8S / "prometheus-scrape.yml").read_text())
    (job,) = config["scrape_configs"]
    del job["kubernetes_sd_configs"]
    job.update(static_configs=targets, scrape_interval="1s", scrape_timeout="1s")
    config["global"] = {"evaluation_interval": "1s"}
    return config


@contextlib.contextmanager
def prometheus(targets: list[dict[str, Any]], workdir: Path) -> Iterator[Prometheus]:
    binary = require_tool("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets)))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        poll("Prometheus ready", lambda: httpx.get(f"{url}/-/ready").is_success or None,
             timeout_s=30, proc=proc, log=log)
        yield Prometheus(url, config, proc)
    finally:
        stop(proc)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """What KEDA's prometheus scaler sends: GET /api/v1/query?query=..."""
    body = httpx.get(f"{url}/api/v1/query", params={"query": expr}).json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def keda_value(url: str, expr: str) -> float:
    """The number KEDA's scaler takes from the answer: an empty result is 0
    (ignoreNullValues, the default); more than one series is an error."""
    result = query(url, expr)
    assert len(result) <= 1, f"KEDA refuses more than one series: {result}"
    return float(result[0]["value"][1]) if result else 0.0


def waiting_on(server: ServerProcess, n: int) -> Callable[[], bool | None]:
    return lambda: queue_depth(server) == n or None


def reads(url: str, expr: str, expected: float) -> Callable[[], float | None]:
    def check() -> float | None:
        value = keda_value(url, expr)
        return value if value == expected else None

    return check


def selectors(expr: str) -> list[str]:
    return re.findall(r"[a-z_]+\{[^}]*\}", expr)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, ServerProcess]]:
    require_tool("prometheus")  # before starting the replicas
    # a batch lasts a minute and a group flushes only when full; no drain at the end
    args = ("--model", "sim", "--sim-base-ms", "60000", "--max-batch-size", str(BATCH),
            "--max-wait-ms", "60000", "--drain-timeout-s", "0", "--warmup", "")
    with running_server(*args, tmp_path=tmp_path, name="a") as a, \
            running_server(*args, tmp_path=tmp_path, name="b") as b:
        yield dict(zip(SENT, (a, b), strict=True))


def test_queue_depth_trigger_reads_the_fleets_waiting_requests(
    fleet: dict[str, ServerProcess], tmp_path: Path
) -> None:
    t2i = triggers(K8S / "scaledobject.yaml")
    targets = [pod_target(server, pod, "t2i") for pod, server in fleet.items()]
    with prometheus(targets, tmp_path / "prom") as prom, \
            ThreadPoolExecutor(sum(SENT.values())) as pool:
        url = prom.url
        try:
            for pod, server in fleet.items():
                for seed in range(SENT[pod]):
                    pool.submit(httpx.post, server.url + "/t2i", timeout=120, json={
                        "prompt": "a harbour", "width": 64, "height": 64, "inference_steps": 1,
                        "seed": seed})
            for pod, server in fleet.items():
                poll(f"{pod} to hold a batch and queue the rest",
                     waiting_on(server, SENT[pod] - BATCH), timeout_s=30)
            value = poll("the trigger's query to see every replica's queue",
                         reads(url, t2i["queue-depth"]["query"], WAITING), timeout_s=30)
            threshold = float(t2i["queue-depth"]["threshold"])
            assert math.ceil(value / threshold) == 2  # AverageValue: ceil(total / threshold)
            assert value > float(t2i["queue-depth"]["activationThreshold"])

            # Every selector of every trigger matches exactly one series per pod, so a wrong
            # label cannot pass as "0": the busy query reads 0 now (no batch has finished).
            for name, trigger in t2i.items():
                for selector in selectors(trigger["query"]):
                    pods = {s["metric"]["pod"] for s in query(url, selector)}
                    assert pods == set(SENT), f"{name}: {selector} matched {pods}"
            assert keda_value(url, t2i["engine-busy"]["query"]) == 0.0
        finally:  # end the held batches now (503s, then exit), also on failure
            for server in fleet.values():
                server.proc.terminate()


JOBS = 20  # submitted with no worker running: all of them wait


def test_jobs_waiting_trigger_reads_the_stream_backlog(tmp_path: Path) -> None:
    """An api pod (no workers yet) takes 20 jobs: the workers' trigger must read 20 and ask for
    ceil(20 / 16) = 2 workers. Then a worker pod starts: it pulls a share of them (the trigger
    reads fewer), and the busy trigger's selector finds its series."""
    if importlib.util.find_spec("batchserve.jobs.redis") is None:
        pytest.skip("the Redis job queue is not in this tree yet")
    from services import redis_server

    require_tool("prometheus")
    workers = triggers(K8S / "jobs" / "worker-scaledobject.yaml")
    waiting, busy = workers["jobs-waiting"], workers["engine-busy"]
    with redis_server(tmp_path) as redis:
        shared = ("--queue", redis.url, "--results", f"file://{tmp_path / 'results'}",
                  "--warmup", "", "--drain-timeout-s", "0")
        with running_server("--role", "api", *shared, tmp_path=tmp_path, name="api") as api:
            api_target = pod_target(api, "batchserve-api-a", "api")
            with prometheus([api_target], tmp_path / "prom") as prom:
                for seed in range(JOBS):
                    submitted = httpx.post(api.url + "/v1/jobs", timeout=10, json={
                        "prompt": "a harbour", "width": 64, "height": 64, "inference_steps": 1,
                        "seed": seed})
                    assert submitted.status_code == 202, submitted.text
                value = poll("the workers' trigger to read the backlog",
                             reads(prom.url, waiting["query"], JOBS), timeout_s=30)
                assert math.ceil(value / float(waiting["threshold"])) == 2
                assert value > float(waiting["activationThreshold"])  # wakes a worker from 0
                for selector in selectors(waiting["query"]):
                    assert {s["metric"]["pod"] for s in query(prom.url, selector)} == {
                        "batchserve-api-a"}
                # no worker pod yet: the busy trigger reads 0, and KEDA accepts the empty answer
                assert keda_value(prom.url, busy["query"]) == 0.0

                # A worker whose batches take a minute: it pulls what it can hold and sits on it.
                sim = ("--model", "sim", "--sim-base-ms", "60000", "--max-batch-size", "4",
                       "--max-wait-ms", "0")
                with running_server("--role", "worker", *shared, *sim, tmp_path=tmp_path,
                                    name="worker") as worker:
                    prom.retarget([api_target, pod_target(worker, "batchserve-worker-a", "worker")])
                    poll("the trigger to see the worker pull its share",
                         fewer(prom.url, waiting["query"], JOBS), timeout_s=30)
                    for selector in selectors(busy["query"]):
                        poll(f"{selector} to find the worker pod",
                             finds(prom.url, selector, "batchserve-worker-a"), timeout_s=30)
                    worker.proc.kill()  # its jobs stay pending in Redis; nothing to drain here


def fewer(url: str, expr: str, than: float) -> Callable[[], float | None]:
    def check() -> float | None:
        value = keda_value(url, expr)
        return value if 0 <= value < than else None

    return check


def finds(url: str, selector: str, pod: str) -> Callable[[], bool | None]:
    return lambda: {s["metric"]["pod"] for s in query(url, selector)} == {pod} or None
