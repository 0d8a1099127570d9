"""Prometheus metrics: `http_*` from prometheus-fastapi-instrumentator, `batchserve_*` here.

Every hook catches and logs its own errors: observing a request can never fail it. No label
takes a user-controlled value.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import ParamSpec

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as pfi_metrics
from starlette.applications import Starlette

log = logging.getLogger("batchserve.metrics")
P = ParamSpec("P")

TRIGGERS = ("full", "timeout", "drain", "join")
REJECT_REASONS = ("queue_full", "timeout", "cancelled", "invalid", "failed", "drained",
                  "overloaded", "deadline", "rate_limited")
TENANT_CODES = ("tenant_queue_full", "rate_limited")
WASTE_REASONS = ("cancelled", "timeout", "drain")
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
JOB_STATUSES = ("queued", "succeeded", "failed", "canceled")
LORA_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
HTTP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


def _never_raise(fn: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(fn)
    def safe(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:
            log.exception("metrics hook %s failed (ignored)", fn.__name__)

    return safe


class Metrics:
    """The batcher's `Hooks` plus readiness and GPU memory gauges, on a registry of its own."""

    def __init__(self, max_batch_size: int, tenants: Iterable[str] = (),
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._tenant_images = Counter(
            "batchserve_tenant_images_admitted", "Images admitted per tenant (--api-keys names)",
            ["tenant"], registry=r,
        )
        self._tenant_refused = Counter(
            "batchserve_tenant_refused", "Requests refused by a tenant's own limit, by code",
            ["tenant", "code"], registry=r,
        )
        self.tenants: frozenset[str] = frozenset()
        self.set_tenants(tenants)
        self._depth = Gauge("batchserve_queue_depth", "Requests waiting in the queue", registry=r)
        self._wait = Histogram(
            "batchserve_queue_wait_seconds", "Admission until the request's batch started",
            buckets=WAIT_BUCKETS, registry=r,
        )
        self._size = Histogram(
            "batchserve_batch_size", "Requests per batch",
            buckets=_size_buckets(max_batch_size), registry=r,
        )
        self._duration = Histogram(
            "batchserve_batch_duration_seconds", "Wall time of one batch in the engine",
            buckets=DURATION_BUCKETS, registry=r,
        )
        self._batches = Counter(
            "batchserve_batches", "Batches started, by flush trigger", ["trigger"], registry=r
        )
        self._step_size = Histogram(
            "batchserve_step_batch_size", "Items sharing one UNet step (continuous policy)",
            buckets=_size_buckets(max_batch_size), registry=r,
        )
        self._active = Gauge(
            "batchserve_active_items", "Items in the running step batch (continuous policy)",
            registry=r,
        )
        self._admitted = Counter(
            "batchserve_requests_admitted", "Requests queued; each ends as one image or one "
            "rejection (failed, timeout, cancelled, drained, deadline)", registry=r,
        )
        self._images = Counter(
            "batchserve_images", "Images generated and encoded for their client", registry=r
        )
        self._size_limit = Gauge(
            "batchserve_batch_size_limit", "Largest batch run per shape (WxHxSTEPSxCFG/sampler), "
            "learned from out-of-memory errors; only shapes that ran out of memory",
            ["shape"], registry=r,
        )
        self._wasted = Counter(
            "batchserve_wasted_images",
            "Images generated with nobody left to take them (client gone, timed out, drain); "
            "generated = batchserve_images_total + this",
            ["reason"], registry=r,
        )
        self._interrupted = Counter(
            "batchserve_batches_interrupted",
            "Batches stopped between denoising steps because nobody waited for them", registry=r,
        )
        self._cap = Gauge(
            "batchserve_batch_cap", "Current batch size limit per batching key (AIMD)",
            ["key"], registry=r,
        )
        self._patience = Gauge(
            "batchserve_client_patience_seconds",
            "Learned client patience per batching key (low percentile of give-up ages)",
            ["key"], registry=r,
        )
        self._rejected = Counter(
            "batchserve_requests_rejected", "Requests not answered with an image, by reason",
            ["reason"], registry=r,
        )
        self._held = Gauge(
            "batchserve_refusals_held", "Refused requests held for a place now "
            "(--refusal-hold-s)", registry=r,
        )
        self._room = Counter(
            "batchserve_refusals_held_ended", "Held requests by how their hold ended: admitted "
            "(a place freed) or refused (the hold passed, or too many held)",
            ["outcome"], registry=r,
        )
        self._gpu_alloc = Gauge(
            "batchserve_gpu_memory_allocated_bytes",
            "Peak torch.cuda memory allocated during the last batch (max_memory_allocated)",
            registry=r,
        )
        self._gpu_reserved = Gauge(
            "batchserve_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved", registry=r
        )
        self._lora_loads = Histogram(
            "batchserve_lora_load_seconds", "Per-request LoRA files read onto the device "
            "(a cache miss), by how long the read took", buckets=LORA_BUCKETS, registry=r,
        )
        self._lora_hits = Counter(
            "batchserve_lora_hits", "Per-request LoRA uses served by a resident adapter",
            registry=r,
        )
        self._lora_evictions = Counter(
            "batchserve_lora_evictions", "Adapters dropped from the LoRA cache (--lora-cache-mb), "
            "least recently used first", registry=r,
        )
        self._lora_resident = Gauge(
            "batchserve_lora_resident", "Adapters resident in the LoRA cache", registry=r,
        )
        self._lora_bytes = Gauge(
            "batchserve_lora_resident_bytes", "Device memory the resident adapters take",
            registry=r,
        )
        self._ready = Gauge("batchserve_ready", "1 when loaded, warmed and accepting", registry=r)
        self._jobs = Counter(
            "batchserve_jobs", "Async jobs accepted (queued) and ended here, by status",
            ["status"], registry=r,
        )
        self._jobs_waiting = Gauge(
            "batchserve_jobs_waiting", "Jobs accepted and not yet pulled by any worker "
            "(read from the queue on each scrape)", registry=r,
        )
        self._job_duration = Histogram(
            "batchserve_job_duration_seconds", "Async job accepted to finished (any end)",
            buckets=JOB_BUCKETS, registry=r,
        )
        for status in JOB_STATUSES:
            self._jobs.labels(status)
        for trigger in TRIGGERS:
            self._batches.labels(trigger)
        for reason in REJECT_REASONS:
            self._rejected.labels(reason)
        for reason in WASTE_REASONS:
            self._wasted.labels(reason)
        for outcome in ("admitted", "refused"):
            self._room.labels(outcome)

    @_never_raise
    def queue_depth(self, depth: int) -> None:
        self._depth.set(depth)

    @_never_raise
    def batch_started(self, size: int, trigger: str, waits_s: Sequence[float]) -> None:
        self._batches.labels(trigger if trigger in TRIGGERS else "timeout").inc()
        self._size.observe(size)
        for wait in waits_s:
            self._wait.observe(max(0.0, wait))

    @_never_raise
    def batch_finished(self, size: int, duration_s: float, images: int) -> None:
        # `images` counts results generated; an image counts once it is encoded (`image`),
        # since an encode failure is the request's one outcome (`failed`), not an image.
        self._duration.observe(duration_s)

    def set_tenants(self, names: Iterable[str]) -> None:
        """The tenant label values allowed (the names in the tenants file, never request
        data): series are created for each, so a dashboard row shows zeros from the start."""
        self.tenants = frozenset(names)
        for name in self.tenants:
            self._tenant_images.labels(name)
            for code in TENANT_CODES:
                self._tenant_refused.labels(name, code)

    @_never_raise
    def tenant_admitted(self, tenant: str, images: int) -> None:
        if tenant in self.tenants:
            self._tenant_images.labels(tenant).inc(images)

    @_never_raise
    def tenant_refused(self, tenant: str, code: str) -> None:
        if tenant in self.tenants and code in TENANT_CODES:
            self._tenant_refused.labels(tenant, code).inc()

    @_never_raise
    def admitted(self) -> None:
        self._admitted.inc()

    @_never_raise
    def image(self) -> None:
        self._images.inc()

    @_never_raise
    def size_limit(self, key: str, limit: int) -> None:
        self._size_limit.labels(key).set(limit)

    @_never_raise
    def step(self, size: int) -> None:
        self._step_size.observe(size)

    @_never_raise
    def active_items(self, count: int) -> None:
        self._active.set(count)

    @_never_raise
    def rejected(self, reason: str) -> None:
        if reason in REJECT_REASONS:
            self._rejected.labels(reason).inc()

    @_never_raise
    def held(self, n: int) -> None:
        self._held.set(n)

    @_never_raise
    def lora_loaded(self, name: str, seconds: float) -> None:
        self._lora_loads.observe(seconds)  # no name label: names are the operator's files,
        # but a label per file would grow without bound as files come and go

    @_never_raise
    def lora_hit(self) -> None:
        self._lora_hits.inc()

    @_never_raise
    def lora_evicted(self) -> None:
        self._lora_evictions.inc()

    @_never_raise
    def lora_resident(self, count: int, nbytes: int) -> None:
        self._lora_resident.set(count)
        self._lora_bytes.set(nbytes)

    @_never_raise
    def left_room(self, outcome: str) -> None:
        self._room.labels(outcome).inc()

    @_never_raise
    def wasted(self, reason: str) -> None:
        if reason in WASTE_REASONS:
            self._wasted.labels(reason).inc()

    @_never_raise
    def batch_interrupted(self) -> None:
        self._interrupted.inc()

    @_never_raise
    def key_state(self, label: str, cap: int, patience_s: float | None) -> None:
        self._cap.labels(label).set(cap)
        # NaN while unknown: the key's series exists from its first batch on
        self._patience.labels(label).set(math.nan if patience_s is None else patience_s)

    @_never_raise
    def key_forgotten(self, label: str) -> None:
        for gauge in (self._cap, self._patience):
            with contextlib.suppress(KeyError):
                gauge.remove(label)

    @_never_raise
    def job_status(self, status: str, duration_s: float | None = None) -> None:
        """A job accepted (`queued`) or ended here, with its duration when it ended."""
        if status in JOB_STATUSES:
            self._jobs.labels(status).inc()
        if duration_s is not None:
            self._job_duration.observe(duration_s)

    @_never_raise
    def jobs_waiting(self, count: int) -> None:
        self._jobs_waiting.set(count)

    @_never_raise
    def ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    @_never_raise
    def gpu_memory(self, sample: tuple[int, int] | None) -> None:
        if sample is not None:
            self._gpu_alloc.set(sample[0])
            self._gpu_reserved.set(sample[1])


def _size_buckets(max_batch_size: int) -> list[float]:
    return [float(n) for n in range(1, max_batch_size + 1)]


def instrument(app: Starlette, metrics: Metrics) -> Instrumentator:
    """Adds the `http_*` middleware; must run before the app starts."""
    instrumentator = Instrumentator(
        excluded_handlers=["/metrics"],
        should_group_status_codes=True,
        registry=metrics.registry,
    )
    # Only the two series the dashboards and rules use. The default set also records request
    # and response sizes and a second latency histogram: a third of the serving overhead
    # measured with the null engine, for series nobody reads.
    instrumentator.add(
        pfi_metrics.requests(registry=metrics.registry),  # by handler, method, status
        pfi_metrics.latency(buckets=HTTP_BUCKETS, should_include_status=False,
                            registry=metrics.registry),  # by handler, method
    )
    instrumentator.instrument(app)
    return instrumentator
