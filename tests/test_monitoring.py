"""Static checks of the monitoring and deployment files.

promtool (Debian `prometheus` package) checks the scrape config and rules and runs the rule
unit tests; dclint (npm) lints the compose file against the Compose schema; the `dockerfile`
package parses the Dockerfile with BuildKit's parser. The dashboards are checked for structure
and for metric names: every `batchserve_*`/`http_*` name must be one the app exposes, every
`DCGM_*` name one dcgm-exporter exports by default. tests/test_prometheus_scrape.py runs the
dashboard queries against a real Prometheus scraping a real server.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules"
DASHBOARDS = MONITORING / "grafana" / "dashboards"
PROVISIONING = MONITORING / "grafana" / "provisioning"
COMPOSE = ROOT / "docker-compose.gpu.yml"
DOCKERFILE = ROOT / "Dockerfile"

# What the app exposes (SPEC "Metrics"), histogram and counter series by base name.
APP_METRICS = {
    "batchserve_queue_depth",
    "batchserve_queue_wait_seconds",
    "batchserve_batch_size",
    "batchserve_batch_duration_seconds",
    "batchserve_batches_total",
    "batchserve_images_total",
    "batchserve_requests_rejected_total",
    "batchserve_tenant_images_admitted_total",
    "batchserve_tenant_refused_total",
    "batchserve_wasted_images_total",
    "batchserve_batches_interrupted_total",
    "batchserve_batch_cap",
    "batchserve_client_patience_seconds",
    "batchserve_gpu_memory_allocated_bytes",
    "batchserve_gpu_memory_reserved_bytes",
    "batchserve_ready",
    "batchserve_step_batch_size",
    "batchserve_active_items",
    "batchserve_jobs_total",
    "batchserve_jobs_waiting",
    "batchserve_job_duration_seconds",
    # prometheus-fastapi-instrumentator: the two series `metrics.instrument` adds
    "http_requests_total",
    "http_request_duration_seconds",
}
METRIC_NAME = re.compile(r"\b((?:batchserve|http)_[a-z0-9_]+|DCGM_[A-Z0-9_]+)\b")
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s", "__interval_ms"}
DASHBOARD_FILES = sorted(DASHBOARDS.glob("*.json"))


def tool(name: str) -> str:
    return require_tool(name)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_dashboard(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(dashboard) if p["type"] != "row"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]


def rule_exprs() -> list[str]:
    return [
        rule["expr"]
        for path in sorted(RULES.glob("*.yml"))
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def recorded_names() -> set[str]:
    return {
        rule["record"]
        for path in sorted(RULES.glob("*.yml"))
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


def dcgm_default_counters() -> set[str]:
    lines = (MONITORING / "dcgm-default-counters.txt").read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def check_metric_names(exprs: list[str]) -> None:
    dcgm = dcgm_default_counters()
    recorded = recorded_names()
    for expr in exprs:
        for name in METRIC_NAME.findall(expr):
            if name.startswith("DCGM_"):
                assert name in dcgm, f"{name} is not a dcgm-exporter default counter: {expr}"
            elif any(f":{name}:" in r and r in expr for r in recorded):
                continue  # the metric part of a series our own rules record
            else:
                base = HISTOGRAM_SUFFIX.sub("", name)
                assert name in APP_METRICS or base in APP_METRICS, f"unknown metric {name}: {expr}"


# --- Prometheus ---------------------------------------------------------------------------


def test_prometheus_config_is_valid() -> None:
    result = run(tool("promtool"), "check", "config", str(MONITORING / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout


def test_prometheus_scrapes_the_compose_services() -> None:
    config = load_yaml(MONITORING / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {name: job["static_configs"][0]["targets"] for name, job in jobs.items()}
    assert targets["batchserve"] == ["api:8000", "worker:8000"]
    assert targets["dcgm-exporter"] == ["dcgm-exporter:9400"]
    assert targets["cadvisor"] == ["cadvisor:8080"]
    assert jobs["dcgm-exporter"]["scrape_interval"] == "1s"
    services = load_yaml(COMPOSE)["services"]
    for job_targets in targets.values():
        host = job_targets[0].split(":")[0]
        assert host == "localhost" or host in services


def test_rules_are_valid() -> None:
    files = [str(p) for p in sorted(RULES.glob("*.yml"))]
    assert len(files) == 2
    result = run(tool("promtool"), "check", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    files = [str(p) for p in sorted((RULES / "tests").glob("*.yml"))]
    assert len(files) == 2
    result = run(tool("promtool"), "test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_every_alert_has_a_unit_test() -> None:
    alerts = {
        rule["alert"]
        for path in RULES.glob("*.yml")
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    assert alerts == {
        "BatchserveQueueBackingUp",
        "BatchserveQueueFull",
        "BatchserveHigh5xxRate",
        "BatchserveWastingWork",
        "BatchserveNotReady",
        "GpuMemoryNearFull",
    }
    tested = {
        case["alertname"]
        for path in (RULES / "tests").glob("*.yml")
        for test in load_yaml(path)["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert tested == alerts


def test_every_recording_rule_has_a_unit_test() -> None:
    tested = {
        case["expr"]
        for path in (RULES / "tests").glob("*.yml")
        for test in load_yaml(path)["tests"]
        for case in test.get("promql_expr_test", [])
    }
    assert recorded_names() == tested
    assert {
        "instance_handler_status:http_requests:rate1m",
        "instance_handler:http_request_duration_seconds:p50_1m",
        "instance_handler:http_request_duration_seconds:p95_1m",
        "instance_handler:http_request_duration_seconds:p99_1m",
        "instance:batchserve_images:rate1m",
        "instance:batchserve_images_delivered:rate1m",
        "instance:batchserve_wasted_images:ratio_rate5m",
        "instance:batchserve_batch_size:mean1m",
        "instance:batchserve_queue_wait_seconds:p95_1m",
    } <= tested


def test_rules_use_known_metrics() -> None:
    check_metric_names(rule_exprs())


# --- DCGM ---------------------------------------------------------------------------------


def test_dcgm_counter_list_is_well_formed() -> None:
    text = (MONITORING / "dcgm-default-counters.txt").read_text()
    assert "NVIDIA/dcgm-exporter" in text and "etc/default-counters.csv" in text
    names = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"DCGM_FI_[A-Z0-9_]+", name) for name in names)
    # The compose file must run the exporter version the list was taken from.
    image = load_yaml(COMPOSE)["services"]["dcgm-exporter"]["image"]
    assert image.split(":")[1].split("-")[1] in text  # "4.8.3"


# --- Grafana ------------------------------------------------------------------------------


def provisioned_datasource_uid() -> str:
    config = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")
    (source,) = config["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    uid: str = source["uid"]
    return uid


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    (provider,) = load_yaml(PROVISIONING / "dashboards" / "batchserve.yml")["providers"]
    assert provider["type"] == "file"
    mounts = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    assert f"./monitoring/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_two_dashboards() -> None:
    titles = {load_dashboard(p)["title"] for p in DASHBOARD_FILES}
    assert titles == {"batchserve API", "GPU"}


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    dashboard = load_dashboard(path)
    uid = provisioned_datasource_uid()
    assert re.fullmatch(r"[a-z0-9-]{1,40}", dashboard["uid"])
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == uid
    for panel in query_panels(dashboard):
        where = f"{path.name}: {panel['title']!r}"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, where
            used = set(re.findall(r"\$(\w+)", target["expr"]))
            assert used <= variables | GRAFANA_BUILTINS, f"{where}: undefined {used - variables}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_metrics_exist(path: Path) -> None:
    check_metric_names(dashboard_exprs(load_dashboard(path)))


def test_api_dashboard_answers_is_batching_working() -> None:
    dashboard = load_dashboard(DASHBOARDS / "batchserve-api.json")
    by_title = {
        p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in query_panels(dashboard)
    }
    expected = {
        "Requests/s by status": ["http_requests_total", "by (status)"],
        "Latency p50 / p95 / p99": ["histogram_quantile(0.5,", "histogram_quantile(0.95,",
                                    "histogram_quantile(0.99,", "http_request_duration_seconds"],
        "Queue depth": ["batchserve_queue_depth"],
        "Queue wait p50 / p95": ["batchserve_queue_wait_seconds_bucket"],
        "Batch size distribution": ["batchserve_batch_size_bucket", "by (le)"],
        "Batches/s by flush trigger": ["batchserve_batches_total", "by (trigger)"],
        "Images/s": ["batchserve_images_total"],
        "Goodput: delivered images/s": ["batchserve_images_total",
                                        "batchserve_wasted_images_total"],
        "Batch cap by key": ["batchserve_batch_cap", "by (key)"],
        "Client patience by key": ["batchserve_client_patience_seconds", "by (key)"],
        "Wasted images/s and interrupted batches/s": ["batchserve_wasted_images_total",
                                                      "batchserve_batches_interrupted_total"],
        "Rejections/s by reason": ["batchserve_requests_rejected_total", "by (reason)"],
        "Jobs waiting": ["max(batchserve_jobs_waiting"],
        "Jobs/s by status": ["batchserve_jobs_total", "by (status)"],
        "Job duration p50 / p95": ["batchserve_job_duration_seconds_bucket"],
        "Tenant images admitted/s": ["batchserve_tenant_images_admitted_total", "by (tenant)"],
        "Tenant refusals/s by code": ["batchserve_tenant_refused_total", "by (tenant, code)"],
    }
    for title, needles in expected.items():
        assert title in by_title, f"missing panel {title!r}"
        for needle in needles:
            assert needle in by_title[title], f"{title!r} lacks {needle!r}"
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["instance", "tenant"]
    # One row per tenant: Grafana repeats the row for each value of $tenant.
    assert any(p.get("repeat") == "tenant" for p in dashboard["panels"] if p["type"] == "row")


def test_gpu_dashboard_answers_is_the_gpu_busy() -> None:
    dashboard = load_dashboard(DASHBOARDS / "gpu.json")
    exprs = " ".join(dashboard_exprs(dashboard))
    for metric in (
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
        "DCGM_FI_DEV_FB_USED",
        "DCGM_FI_DEV_FB_FREE",
        "DCGM_FI_DEV_POWER_USAGE",
        "DCGM_FI_DEV_GPU_TEMP",
        "DCGM_FI_DEV_SM_CLOCK",
        "batchserve_gpu_memory_allocated_bytes",
        "batchserve_gpu_memory_reserved_bytes",
    ):
        assert metric in exprs, f"GPU dashboard lacks {metric}"
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert {"instance", "gpu"} <= set(names)
    for expr in dashboard_exprs(dashboard):
        for selector in re.findall(r"DCGM_\w+\{([^}]*)\}", expr):
            assert 'instance=~"$instance"' in selector and 'gpu=~"$gpu"' in selector, expr


# --- docker compose -----------------------------------------------------------------------


def test_compose_file_lints() -> None:
    result = run(tool("dclint"), "--max-warnings", "0", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"api", "worker", "redis", "s3", "prometheus", "grafana",
                             "dcgm-exporter", "cadvisor"}
    published = {
        name: [int(p.rsplit(":", 2)[-1]) for p in service["ports"]]
        for name, service in services.items() if "ports" in service
    }
    # Redis, S3 and the worker are reached only inside the stack.
    assert published == {
        "api": [8000], "prometheus": [9090], "grafana": [3000],
        "dcgm-exporter": [9400], "cadvisor": [8080],
    }
    for name in ("worker", "dcgm-exporter"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
    assert "deploy" not in services["api"]  # the api loads no model: no GPU
    for name in ("api", "worker"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile"
        env = services[name]["environment"]
        assert env["BATCHSERVE_ROLE"] == name
        assert env["BATCHSERVE_QUEUE"] == "redis://redis:6379/0"
        assert env["BATCHSERVE_RESULTS"].startswith("s3://")
        assert env["BATCHSERVE_S3_ENDPOINT_URL"] == "http://s3:8333"
        assert set(services[name]["depends_on"]) == {"redis", "s3"}
    assert "models:/models" in services["worker"]["volumes"]
    assert "--appendonly" in services["redis"]["command"]
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert services["s3"]["command"][:3] == ["server", "-dir=/data", "-s3"]

    dcgm = services["dcgm-exporter"]
    assert dcgm["image"].startswith("nvcr.io/nvidia/k8s/dcgm-exporter:")
    assert dcgm["cap_add"] == ["SYS_ADMIN"]
    assert dcgm["command"] == ["-c", "1000"]

    env = services["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD")

    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"missing bind-mount source {source}"
            elif not source.startswith("/"):
                assert source in compose["volumes"], f"undeclared volume {source}"


# --- Dockerfile ---------------------------------------------------------------------------


def dockerfile_commands() -> list[Any]:
    dockerfile = pytest.importorskip("dockerfile", reason="`dockerfile` (BuildKit parser) absent")
    commands: list[Any] = list(dockerfile.parse_file(str(DOCKERFILE)))
    return commands


def final_stage(commands: list[Any]) -> list[Any]:
    starts = [i for i, c in enumerate(commands) if c.cmd == "FROM"]
    return commands[starts[-1]:]


def test_dockerfile_builds_on_cuda_runtime() -> None:
    commands = dockerfile_commands()
    (base,) = [c.value[0] for c in commands if c.cmd == "ARG" and c.value[0].startswith("CUDA_")]
    assert re.fullmatch(r"CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d+\.\d+", base)
    installs = " ".join(" ".join(c.value) for c in commands if c.cmd == "RUN")
    assert 'pip install ".[gpu]"' in installs


def test_dockerfile_runtime_stage() -> None:
    stage = final_stage(dockerfile_commands())
    by_cmd: dict[str, list[Any]] = {}
    for command in stage:
        by_cmd.setdefault(command.cmd, []).append(command)
    user = by_cmd["USER"][-1].value[0]
    assert user not in {"root", "0"}
    assert "/models" in by_cmd["VOLUME"][0].value
    env = " ".join(" ".join(c.value) for c in by_cmd["ENV"])
    assert "HF_HOME /models" in env
    assert by_cmd["CMD"][-1].value == ("batchserve", "serve", "--host", "0.0.0.0")
    (healthcheck,) = by_cmd["HEALTHCHECK"]
    kind, *argv = healthcheck.value
    assert kind == "CMD" and argv[:2] == ["python", "-c"]
    assert "/readyz" in argv[2]
    compile(argv[2], "HEALTHCHECK", "exec")


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = {
        c.value[0].rstrip("/")
        for c in dockerfile_commands()
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)
    }
    assert copied <= allowed
    assert "*" in patterns
