"""/metrics exposes every SPEC metric with its type, and the batch metrics move."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from batchserve.api import create_app
from batchserve.metrics import Metrics
from batchserve.service import Service
from batchserve.settings import Settings

from fakes import FakeEngine

SPEC_METRICS = {
    "batchserve_queue_depth": "gauge",
    "batchserve_queue_wait_seconds": "histogram",
    "batchserve_batch_size": "histogram",
    "batchserve_batch_duration_seconds": "histogram",
    "batchserve_batches": "counter",
    "batchserve_images": "counter",
    "batchserve_requests_rejected": "counter",
    "batchserve_gpu_memory_allocated_bytes": "gauge",
    "batchserve_gpu_memory_reserved_bytes": "gauge",
    "batchserve_ready": "gauge",
    "batchserve_jobs": "counter",
    "batchserve_jobs_waiting": "gauge",
    "batchserve_job_duration_seconds": "histogram",
    "http_requests": "counter",
    "http_request_duration_seconds": "histogram",
}


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = Settings(model="fake", max_wait_ms=0, max_batch_size=4, warmup="")
    service = Service(settings, engine_factory=lambda s: FakeEngine())
    with TestClient(create_app(settings, service)) as client:
        assert client.portal.call(service.wait_loaded) == "ready"
        yield client


def scrape(client: TestClient) -> dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    text = client.get("/metrics").text
    out: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in text_string_to_metric_families(text):
        samples = out.setdefault(f"{family.name}:{family.type}", {})
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]],
          sample: str, **labels: str) -> float:
    for samples in metrics.values():
        for (name, lbls), v in samples.items():
            if name == sample and all(dict(lbls).get(k) == x for k, x in labels.items()):
                return v
    raise KeyError(sample)


def test_every_spec_metric_is_exposed_with_its_type(client: TestClient) -> None:
    client.post("/t2i", json={"prompt": "x", "width": 64, "height": 64, "seed": 1})
    families = {key.split(":")[0]: key.split(":")[1] for key in scrape(client)}
    for name, kind in SPEC_METRICS.items():
        assert families.get(name) == kind, name


def test_batch_metrics_move_when_a_batch_runs(client: TestClient) -> None:
    before = scrape(client)
    assert value(before, "batchserve_ready") == 1
    r = client.post("/t2i", json={"prompt": "x", "width": 64, "height": 64, "seed": 1})
    assert r.status_code == 200
    client.post("/t2i", json={"prompt": "x", "bogus": 1})
    after = scrape(client)
    assert value(after, "batchserve_images_total") == value(before, "batchserve_images_total") + 1
    assert value(after, "batchserve_batch_size_count") == 1
    assert value(after, "batchserve_batch_duration_seconds_count") == 1
    assert value(after, "batchserve_queue_wait_seconds_count") == 1
    assert value(after, "batchserve_batches_total", trigger="timeout") == 1
    assert value(after, "batchserve_requests_rejected_total", reason="invalid") == 1
    assert value(after, "batchserve_queue_depth") == 0
    assert value(after, "http_requests_total", handler="/t2i", status="2xx") == 1
    assert value(after, "http_requests_total", handler="/t2i", status="4xx") == 1


def test_metrics_endpoint_is_not_counted_in_http_metrics(client: TestClient) -> None:
    scrape(client)
    text = client.get("/metrics").text
    assert 'handler="/metrics"' not in text


def test_hooks_never_raise() -> None:
    metrics = Metrics(max_batch_size=4)
    metrics.batch_started(2, "timeout", [float("nan"), "oops"])  # type: ignore[list-item]
    metrics.gpu_memory((1, "x"))  # type: ignore[arg-type]
    metrics.rejected("made-up")  # unknown reasons are dropped, never a new label


def test_gpu_gauges_stay_zero_without_cuda(client: TestClient) -> None:
    metrics = scrape(client)
    assert value(metrics, "batchserve_gpu_memory_allocated_bytes") == 0
    assert value(metrics, "batchserve_gpu_memory_reserved_bytes") == 0


def test_batch_key_labels_never_merge_two_keys() -> None:
    """Issue 18 item 10: guidance was written with `:g` (6 digits), so two keys shared one
    metric label and forgetting one removed the other's series."""
    from batchserve.engines.protocol import key_label
    from batchserve.service import shape_label

    a, b = (512, 512, 20, 7.1234561, ""), (512, 512, 20, 7.1234562, "")
    assert key_label(a) != key_label(b)
    assert shape_label((512, 512, 7.1234561)) != shape_label((512, 512, 7.1234562))
    assert key_label((512, 512, 20, 7.5, "euler-a")) == "512x512x20x7.5/euler-a"
    assert key_label((512, 512, 20, 7.0, "")) == "512x512x20x7"
