"""A real Prometheus scrapes a real batchserve under a short load; the dashboards get data.

The server runs the tiny model on a free loopback port; Prometheus (Debian's package) runs
monitoring/prometheus.yml's `batchserve` job and monitoring/rules/ against it, scraping and
evaluating every second. After a bounded burst of /t2i requests, every dashboard query is
sent through Prometheus' HTTP API: those over `batchserve_*`/`http_*` metrics must return
series; those over DCGM metrics (no GPU here) must at least parse and evaluate.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from conftest import IN_CI, ServerProcess, free_port, running_server

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None and not IN_CI,
    reason="`prometheus` not installed (apt: prometheus)",
)

OK_REQUESTS = 16
MAX_BATCH = 4
# What Grafana would put in; `.*` is its "All" value for the instance/GPU variables.
API_KEY = "scrape-test-key"
VARIABLES = {
    "instance": ".*",
    "tenant": ".*",
    "app": ".*",
    "gpu": ".*",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}
T = TypeVar("T")


@dataclass(frozen=True)
class Stack:
    app_url: str
    instance: str
    prometheus_url: str


def poll(what: str, check: Callable[[], T | None], timeout_s: float,
         proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> T:
    """Calls `check` until it returns a value, or fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            output = log.read_text()[-3000:] if log else ""
            pytest.fail(f"{what}: process exited with {proc.returncode}\n{output}")
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            output = log.read_text()[-3000:] if log else ""
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{output}")
        time.sleep(0.25)  # polling an external process, bounded by the deadline


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("scraped_server")
    # With a key the server has a tenant ("default"), so the dashboard's tenant row has data.
    args = ("--model", "tiny", "--host", "127.0.0.1", "--api-key", API_KEY,
            "--max-batch-size", str(MAX_BATCH), "--max-wait-ms", "1000")
    with running_server(*args, tmp_path=tmp, env={"BATCHSERVE_LOG_LEVEL": "warning"}) as server:
        yield server


def prometheus_config(target: str) -> dict[str, Any]:
    """monitoring/prometheus.yml with only its batchserve job, aimed at `target`, at 1 s."""
    config: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / pattern) for pattern in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "batchserve"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture(scope="module")
def stack(server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    app_url, instance = server.url, f"127.0.0.1:{server.port}"
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(prometheus_config(instance)))
    port = free_port()
    log = workdir / "prometheus.log"
    argv = [
        shutil.which("prometheus") or "prometheus",
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    url = f"http://127.0.0.1:{port}"
    try:
        poll("Prometheus /-/ready", lambda: httpx.get(f"{url}/-/ready").is_success or None,
             timeout_s=30, proc=proc, log=log)
        stack = Stack(app_url, instance, url)
        # A first scrape before the load, so rates see the counters rise.
        poll("a first scrape", lambda: value(stack, 'up{job="batchserve"}') == 1 or None,
             timeout_s=30, proc=proc, log=log)
        send_load(app_url)
        # Scraped: Prometheus holds the final counts, and the rules have seen them.
        poll("Prometheus to scrape the load",
             lambda: scraped(stack) or None, timeout_s=30, proc=proc, log=log)
        yield stack
    finally:
        stop(proc)


def send_load(app_url: str) -> None:
    """OK_REQUESTS concurrent good requests and one invalid one; bounded in count and time."""

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=app_url, timeout=60,
                                     headers={"authorization": f"Bearer {API_KEY}"}) as client:
            good = [
                client.post("/t2i", json={
                    "prompt": f"a red cube {i}", "width": 64, "height": 64,
                    "inference_steps": 2, "seed": i,
                })
                for i in range(OK_REQUESTS)
            ]
            bad = client.post("/t2i", json={"prompt": "a red cube", "stepz": 2})
            responses = await asyncio.gather(*good, bad)
        return [r.status_code for r in responses]

    statuses = asyncio.run(burst())
    assert statuses == [200] * OK_REQUESTS + [422]


def query(stack: Stack, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.prometheus_url}/api/v1/query", params={"query": expr})
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def value(stack: Stack, expr: str) -> float | None:
    result = query(stack, expr)
    return float(result[0]["value"][1]) if result else None


def scraped(stack: Stack) -> bool:
    ok = value(stack, 'sum(http_requests_total{handler="/t2i", status="2xx"})')
    recorded = value(stack, "count(instance:batchserve_images:rate1m > 0)")
    # Series born in the load need two samples before rate() has a value.
    rated = value(stack, 'count(rate(http_requests_total{handler="/t2i"}[1m]))')
    return ok == OK_REQUESTS and recorded == 1 and rated is not None


def substitute(expr: str) -> str:
    for name, replacement in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${name}", replacement)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def panel_queries() -> list[Any]:
    params = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        nested = [p for row in dashboard["panels"] for p in row.get("panels", [])]
        for panel in dashboard["panels"] + nested:
            for target in panel.get("targets", []):
                name = f"{path.stem}:{panel['id']}:{panel['title']}:{target['refId']}"
                params.append(pytest.param(target["expr"], id=name))
    return params


@pytest.mark.parametrize("expr", panel_queries())
def test_dashboard_query_returns_data(stack: Stack, expr: str) -> None:
    result = query(stack, substitute(expr))
    if "DCGM_" in expr:
        return  # no GPU here: it parsed and evaluated; the names are checked in test_monitoring
    assert result, f"no data for {expr}"


def test_template_variables_list_the_server(stack: Stack) -> None:
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text())["templating"]["list"]:
            match = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            metric, _, label = match.groups()
            if metric.startswith("DCGM_"):
                continue
            response = httpx.get(f"{stack.prometheus_url}/api/v1/label/{label}/values",
                                 params={"match[]": metric})
            # Instance variables list the server; the tenant variable its one tenant.
            expected = "default" if label == "tenant" else stack.instance
            assert expected in response.json()["data"], variable["name"]


def test_the_load_is_counted(stack: Stack) -> None:
    assert value(stack, "sum(batchserve_images_total)") == OK_REQUESTS
    assert value(stack, 'sum(batchserve_requests_rejected_total{reason="invalid"})') == 1
    assert value(stack, 'sum(http_requests_total{handler="/t2i", status="4xx"})') == 1
    assert value(stack, "max(batchserve_ready)") == 1
    batches = value(stack, "sum(batchserve_batches_total)")
    assert batches is not None and OK_REQUESTS / MAX_BATCH <= batches < OK_REQUESTS
    mean = value(stack, "max(instance:batchserve_batch_size:mean1m)")
    assert mean is not None and 1 < mean <= MAX_BATCH


def test_rules_load_and_evaluate(stack: Stack) -> None:
    groups = httpx.get(f"{stack.prometheus_url}/api/v1/rules").json()["data"]["groups"]
    assert {g["name"] for g in groups} == {"batchserve.recording", "batchserve.alerts",
                                           "gpu.alerts"}
    rules = [rule for group in groups for rule in group["rules"]]
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    for rule in rules:
        if rule["type"] == "recording":
            assert query(stack, rule["name"]), f"{rule['name']} recorded nothing"
        else:
            # A healthy server under a light load must not page anyone.
            assert rule["state"] == "inactive", f"{rule['name']} is {rule['state']}"
