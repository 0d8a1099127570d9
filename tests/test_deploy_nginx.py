"""deploy/nginx: `nginx -t` on the rendered template, then a real nginx in front of two real
`--model sim` replicas on loopback: it spreads the load over both, retries a draining replica's
503 on the other with no failure the client can see, and answers its own errors in batchserve's
JSON shape. The compose file and its Prometheus config name the same replicas as the rendering.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.balancer import balancer, check, loopback_config
from deploy.nginx.render import NginxConfig, compose_upstreams, render, write

from conftest import ServerProcess, free_port, require_tool, running_server

ROOT = Path(__file__).resolve().parents[1]
NGINX_DIR = ROOT / "deploy" / "nginx"
BODY = {"prompt": "a lighthouse", "width": 64, "height": 64, "inference_steps": 1}


def counter(server: ServerProcess, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name)


def directive(conf: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", conf, flags=re.MULTILINE)


# --- static ------------------------------------------------------------------------------


def test_rendered_template_passes_nginx_t(tmp_path: Path) -> None:
    nginx = require_tool("nginx")
    conf = write(loopback_config(["127.0.0.1:1", "127.0.0.1:2"], tmp_path, 8080),
                 tmp_path / "nginx.conf")
    result = check(nginx, conf, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_shipped_compose_config_is_the_template_rendered() -> None:
    shipped = (NGINX_DIR / "nginx.conf").read_text()
    assert shipped == render(NginxConfig(compose_upstreams(4)))


def test_the_retry_and_limit_rules() -> None:
    conf = render(NginxConfig(["a:8000", "b:8000"]))
    assert "least_conn;" in conf and directive(conf, "zone") == ["batchserve 1m"]
    # retried only when nothing was accepted: never on a timeout, never on 429
    (retry,) = directive(conf, "proxy_next_upstream")
    assert retry.split() == ["error", "http_503", "non_idempotent"]
    assert directive(conf, "proxy_next_upstream_tries") == ["2"]
    assert directive(conf, "client_max_body_size") == ["65536"]  # = --max-body-bytes default
    (read,) = directive(conf, "proxy_read_timeout")
    assert int(read.rstrip("s")) > 300  # longer than --request-timeout-s
    # keepalive to the replicas: HTTP/1.1 without `Connection: close`, idle shorter than
    # uvicorn's 30 s keep-alive
    assert directive(conf, "proxy_http_version") == ["1.1"]
    assert directive(conf, "proxy_set_header Connection") == ['""']
    (idle,) = directive(conf, "keepalive_timeout")
    assert int(idle.rstrip("s")) < 30


def test_compose_runs_one_replica_per_gpu_behind_nginx_and_scrapes_each() -> None:
    compose = yaml.safe_load((NGINX_DIR / "compose.yml").read_text())
    services = compose["services"]
    replicas = sorted(name for name in services if name.startswith("replica-"))
    assert [f"{name}:8000" for name in replicas] == compose_upstreams(4)
    gpus = []
    for name in replicas:
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        gpus += device["device_ids"]
        grace = int(services[name]["stop_grace_period"].rstrip("s"))
        assert grace > float(services[name]["environment"]["BATCHSERVE_DRAIN_TIMEOUT_S"])
    assert sorted(gpus) == [str(i) for i in range(len(replicas))]  # one GPU each, no sharing
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in services["nginx"]["volumes"]
    prometheus = yaml.safe_load((NGINX_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "batchserve"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == compose_upstreams(4)


def test_compose_file_matches_the_compose_spec() -> None:
    schema = json.loads((NGINX_DIR / "schemas" / "compose-spec.json").read_text())
    compose = yaml.safe_load((NGINX_DIR / "compose.yml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (NGINX_DIR / source).exists(), f"missing bind-mount source {source}"
            else:
                assert source in compose["volumes"], f"undeclared volume {source}"


def test_compose_prometheus_config_passes_promtool() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "config", "--syntax-only",
                             str(NGINX_DIR / "prometheus.yml")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# --- live --------------------------------------------------------------------------------


@pytest.fixture
def nginx() -> str:
    return require_tool("nginx")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    args = ("--model", "sim", "--sim-base-ms", "100", "--max-batch-size", "4",
            "--max-wait-ms", "20", "--warmup", "")
    with running_server(*args, tmp_path=tmp_path, name="a") as a, \
            running_server(*args, tmp_path=tmp_path, name="b") as b:
        yield a, b


def post(url: str, seed: int) -> httpx.Response:
    return httpx.post(url + "/t2i", json={**BODY, "seed": seed}, timeout=60)


def test_nginx_spreads_load_over_every_replica(
    pair: tuple[ServerProcess, ServerProcess], nginx: str, tmp_path: Path
) -> None:
    a, b = pair
    with balancer([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"], tmp_path / "ngx",
                  nginx) as lb, ThreadPoolExecutor(16) as pool:
        statuses = [r.status_code for r in pool.map(lambda s: post(lb.url, s), range(32))]
        assert statuses == [200] * 32
        images = counter(a, "batchserve_images_total"), counter(b, "batchserve_images_total")
        assert sum(images) == 32
        assert min(images) > 0, f"one replica got nothing: {images}"
        assert {r["upstream_addr"] for r in lb.records()} == {
            f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}


def test_a_draining_replicas_503_is_retried_on_the_other(
    nginx: str, tmp_path: Path
) -> None:
    # `slow` holds one long batch, so once signalled it drains for seconds: listening,
    # answering /t2i with 503. `fast` answers at once.
    slow_args = ("--model", "sim", "--sim-base-ms", "4000", "--max-batch-size", "1",
                 "--max-wait-ms", "0", "--warmup", "")
    fast_args = ("--model", "sim", "--sim-base-ms", "10", "--warmup", "", "--max-wait-ms", "0")
    with running_server(*slow_args, tmp_path=tmp_path, name="slow") as slow, \
            running_server(*fast_args, tmp_path=tmp_path, name="fast") as fast, \
            ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, slow.url, 0)  # straight to the replica, not through nginx
        _wait(slow, lambda: counter(slow, "batchserve_queue_wait_seconds_count") == 1)
        slow.proc.send_signal(signal.SIGTERM)
        _wait(slow, lambda: httpx.get(slow.url + "/readyz").status_code == 503)
        with balancer([f"127.0.0.1:{slow.port}", f"127.0.0.1:{fast.port}"],
                      tmp_path / "ngx", nginx) as lb:
            # sequential: with no open connections least_conn takes the replicas in turn, so
            # the draining one is tried within the first two
            responses = [post(lb.url, seed) for seed in range(1, 5)]
            assert [r.status_code for r in responses] == [200] * 4
            tried = [r["upstream_status"] for r in lb.records()]
        assert "503, 200" in tried, tried
        assert counter(fast, "batchserve_images_total") == 4
        assert held.result(timeout=30).status_code == 200  # the drain finished its own work
        assert slow.proc.wait(30) == 0


def test_nginx_errors_keep_batchserve_error_shape(nginx: str, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{_closed_port()}"
    with balancer([dead], tmp_path / "ngx", nginx) as lb:
        too_big = httpx.post(lb.url + "/t2i", content=b"x" * 70_000,
                             headers={"content-type": "application/json"}, timeout=10)
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "body_too_large"
        nobody = post(lb.url, 1)  # the only replica refuses connections
        assert nobody.status_code == 503
        assert nobody.json()["error"]["code"] == "not_ready"
        assert nobody.headers["retry-after"] == "5"


def _closed_port() -> int:
    return free_port()  # bound then released: nothing listens there


def _wait(server: ServerProcess, predicate: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out:\n{server.logs()}")
        time.sleep(0.02)  # polling an external process, bounded by the deadline
