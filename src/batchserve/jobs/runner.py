"""The worker loop (`--role all|worker`): pulls jobs from the queue into the one `Batcher`.

It holds at most about two batches of jobs (`2 * max_batch_size`, the batch in flight
included), so with several workers jobs spread over them instead of piling up on the first.
Each pulled job goes into the same `Batcher` as `/t2i` requests, with its batching key and
priority, so async and sync requests of one key share batches.

Per job: read the record (a job canceled while queued is acknowledged, never generated) ->
submit -> mark `running` (a cancel that won the race drops it) -> await the image -> read the
record again (canceled while running: the result is discarded) -> store the image -> mark
`succeeded` -> acknowledge. Acknowledging last means a worker that dies at any point leaves the
job pending for another worker (at-least-once generation); the compare-and-set transitions
mean one final result. Past `--job-max-attempts` deliveries a job fails with `worker_lost`.

While it holds jobs it renews them (`JobQueue.renew`) every third of
`--job-visibility-timeout-s`, so a job that waits in the batcher or generates for longer than the
timeout stays this worker's: only a worker that stopped renewing (dead, or its event loop stuck)
has its jobs handed to another one.

On drain the loop stops pulling; what the batcher finishes within the grace period is stored
and acknowledged; the rest goes back to the queue (`release`) for another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .. import tenants
from ..encode import MEDIA_TYPES
from ..errors import (
    BatchServeError,
    Draining,
    GenerationFailed,
    NotFound,
    NotReady,
    Overloaded,
    QueueFull,
    ValidationError,
)
from ..schema import T2IRequest
from .protocol import BackendUnavailable, Delivery
from .record import JobError, JobResult, Status, TransitionRefused

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..sched.request_queue import Outcome
    from ..settings import Settings
    from .service import JobService

log = logging.getLogger("batchserve.jobs")
T = TypeVar("T")
MAX_BACKOFF_S = 10.0


@dataclass(eq=False, slots=True)
class _Held:
    delivery: Delivery
    future: asyncio.Future[Outcome[asyncio.Future[bytes]]] | None = None


class Generator(Protocol):
    """What the runner needs of the process that generates (`service.Service`): it is handed
    this, so jobs/ never imports the service."""

    @property
    def ready(self) -> bool:
        """The model is loaded and the process admits work."""
        ...

    async def wait_loaded(self) -> str:
        """Returns once loading ended, ready or failed."""
        ...

    def submit(self, request: T2IRequest, fmt: str = "png", *, online: bool = True,
               progress_key: str | None = None,
               ) -> asyncio.Future[Outcome[asyncio.Future[bytes]]]:
        """Queues one image; the outcome's result is a future of the encoded bytes; its steps
        are reported under `progress_key` (the job's id)."""
        ...

    async def prefetch_loras(self, requests: Sequence[T2IRequest]) -> None:
        """Reads the requests' LoRA files onto the device before they are queued."""
        ...


class JobRunner:
    """Pulls, submits and stores jobs (see the module). When the batcher refuses a job (queue
    full, overloaded, not ready) the job goes back to the queue and pulling pauses for the
    refusal's Retry-After (0.25 s to `MAX_BACKOFF_S`): pulled again at once, the same job
    would be refused again, a spin of queue round trips that takes the CPU from the engine."""

    def __init__(self, generator: Generator, jobs: JobService, settings: Settings,
                 metrics: Metrics, *, block_s: float = 1.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.generator = generator
        self.jobs = jobs
        self.settings = settings
        self.metrics = metrics
        self.queue = jobs.queue
        self.capacity = 2 * settings.max_batch_size
        self.max_attempts = settings.job_max_attempts
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.block_s = block_s
        self._sleep = sleep
        self._pause_s = 0.0  # set by a refusal: pull again only after this long
        self.problem: str | None = None
        """Why the backend cannot be reached right now (readiness says so), else None."""
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._pulling = True
        self._loop: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        return len(self._held)

    def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="job-runner")
        self._heartbeat = asyncio.create_task(self._renewing(), name="job-heartbeat")

    async def _renewing(self) -> None:
        interval = self.settings.job_visibility_timeout_s / 3
        while True:
            await asyncio.sleep(interval)  # a period, not a wait for something to happen
            await self.renew()

    async def renew(self) -> int:
        """One heartbeat: restarts the visibility timeout of every job held here. Returns how
        many were renewed; a job another worker claimed meanwhile (this one was silent past the
        timeout) is left to it, and the compare-and-set transitions keep one result."""
        held = [h.delivery for h in self._held.values()]
        if not held:
            return 0
        try:
            renewed = await self.queue.renew(self.consumer, held)
        except Exception as exc:  # the next heartbeat tries again; pull reports readiness
            log.warning("renewing %d held jobs failed: %s", len(held), exc)
            return 0
        if renewed < len(held):
            log.warning("%d of %d held jobs were claimed by another worker meanwhile",
                        len(held) - renewed, len(held))
        return renewed

    async def _run(self) -> None:
        await self.generator.wait_loaded()
        if not self.generator.ready:
            return
        backoff = 0.5
        while self._pulling:
            if self._pause_s > 0:
                pause, self._pause_s = self._pause_s, 0.0
                await self._sleep(pause)
                continue
            room = self.capacity - len(self._held)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                deliveries = await self.queue.pull(self.consumer, room, self.block_s)
            except Exception as exc:  # unreachable, or a bug: the loop must outlive both
                if not isinstance(exc, BackendUnavailable):
                    log.exception("pulling jobs failed")
                self._unreachable(exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            self._reachable()
            backoff = 0.5
            for delivery in deliveries:
                self._take(delivery)

    def _take(self, delivery: Delivery) -> None:
        if delivery.job_id in self._held:
            return  # our own job, redelivered past the visibility timeout: still ours
        if not self._pulling:
            self._spawn(self.queue.release(delivery))
            return
        held = _Held(delivery)
        self._held[delivery.job_id] = held
        self._spawn(self._handle(held))

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def guarded() -> None:
            try:
                await work
            except BackendUnavailable as exc:
                self._unreachable(exc, None)  # the delivery stays pending: claimed again later
            except Exception:
                log.exception("job runner step failed")

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, held: _Held) -> None:
        try:
            await self._process(held)
        finally:
            self._held.pop(held.delivery.job_id, None)
            self._room.set()

    async def _process(self, held: _Held) -> None:
        d, jobs = held.delivery, self.jobs
        record = await self.queue.get(d.job_id)
        if record is None or record.status.terminal:  # expired, deleted or canceled: skip
            await self.queue.ack(d)
            return
        if d.attempts > self.max_attempts:
            await self._end(d, Status.FAILED, error=JobError(
                "worker_lost", f"the job was handed to {self.max_attempts} workers and none "
                "finished it"))
            return
        pixels = await jobs.inputs(record)  # unreachable store: left for redelivery
        if pixels is None and record.request.get("init_image") is not None:
            await self._end(d, Status.FAILED, error=JobError(
                "input_gone", "the job's init image expired or was deleted before it ran"))
            return
        try:
            req = T2IRequest.from_fields(record.request, pixels)
        except (TypeError, ValueError, KeyError) as exc:
            # Written by a version with other fields, or its input image is gone: fail it,
            # don't retry it.
            await self._end(d, Status.FAILED, error=JobError(
                "invalid_request", f"the stored request cannot run here: {exc}"))
            return
        try:
            await self.generator.prefetch_loras([req])
        except ValidationError as exc:  # its LoRA file is gone since it was accepted
            await self._end(d, Status.FAILED, error=JobError("invalid_request", exc.message))
            return
        try:
            # Its tenant's fair share: the runner's task is nobody's request, so say whose.
            token = tenants.CURRENT.set(record.tenant)
            try:
                held.future = self.generator.submit(req, record.format, online=False,
                                                    progress_key=d.job_id)
            finally:
                tenants.CURRENT.reset(token)
        except (Draining, NotReady, QueueFull, Overloaded) as exc:  # not now: later or elsewhere
            # Not held any more before it is released: a heartbeat in between would count it
            # as "claimed by another worker".
            self._held.pop(d.job_id, None)
            self._pause_s = max(self._pause_s, min(max(exc.retry_after_s or 1.0, 0.25),
                                                   MAX_BACKOFF_S))
            await self.queue.release(d)
            return
        except BatchServeError as exc:  # its timeout_s cannot be met here at all
            await self._end(d, Status.FAILED, error=JobError(exc.code, exc.message))
            return
        try:
            await jobs.transition(d.job_id, Status.RUNNING, started_at=jobs.now(),
                                  attempts=d.attempts)
        except (TransitionRefused, NotFound):  # canceled (or gone) just now
            held.future.cancel()
            await self.queue.ack(d)
            return
        except BaseException:  # the backend failed us: nobody would take this image
            held.future.cancel()
            raise
        try:
            outcome = await held.future
            data = await outcome.result
        except asyncio.CancelledError:
            if _being_cancelled():
                raise
            await self.queue.ack(d)  # DELETE canceled it here; its record says so already
            return
        except Draining:
            await self._requeue(d)
            return
        except BatchServeError as exc:  # what /t2i would have answered: generation failed, timeout
            await self._end(d, Status.FAILED, error=JobError(exc.code, exc.message))
            return
        except Exception as exc:  # e.g. encoding failed: still one final answer
            log.exception("job %s failed", d.job_id)
            failed = GenerationFailed(f"generation failed ({type(exc).__name__}); see server logs")
            await self._end(d, Status.FAILED, error=JobError(failed.code, failed.message))
            return
        await self._finish(d, req, record.format, outcome, data)

    async def _finish(self, d: Delivery, req: T2IRequest, fmt: str,
                      outcome: Outcome[Any], data: bytes) -> None:
        current = await self.queue.get(d.job_id)
        if current is None or current.status is not Status.RUNNING:  # canceled while running
            await self.queue.ack(d)
            return
        await _persist(lambda: self.jobs.store.put(d.job_id, data, MEDIA_TYPES[fmt]))
        result = JobResult(
            seed=req.seed, width=req.width, height=req.height, format=fmt,
            batch_size=outcome.batch_size, queue_ms=round(outcome.queue_s * 1000, 1),
            inference_ms=round(outcome.inference_s * 1000, 1),
        )
        try:
            await _persist(lambda: self.jobs.transition(
                d.job_id, Status.SUCCEEDED, result=result, completed_at=self.jobs.now()))
        except (TransitionRefused, NotFound):
            # Canceled after all: nobody may read it. Unless another worker, which claimed the
            # job while this one was silent past the visibility timeout, finished it first:
            # its image (same request, same seed) is the job's one result; keep it.
            after = await self.queue.get(d.job_id)
            if after is None or after.status is not Status.SUCCEEDED:
                await _persist(lambda: self.jobs.store.delete(d.job_id))
        await _persist(lambda: self.queue.ack(d))

    async def _end(self, d: Delivery, status: Status, **changes: Any) -> None:
        with contextlib.suppress(TransitionRefused, NotFound):
            await self.jobs.transition(d.job_id, status, completed_at=self.jobs.now(),
                                       **changes)
        await self.queue.ack(d)

    async def _requeue(self, d: Delivery) -> None:
        with contextlib.suppress(TransitionRefused, NotFound):
            await self.jobs.transition(d.job_id, Status.QUEUED, started_at=None)
        await self.queue.release(d)

    def cancel_local(self, job_id: str) -> bool:
        """Drops the job from this process's batcher (queued) or discards its result
        (in flight). True when this runner held it."""
        held = self._held.get(job_id)
        if held is None or held.future is None:
            return False
        held.future.cancel()
        return True

    # -- readiness ---------------------------------------------------------------------------

    def _unreachable(self, exc: Exception, retry_s: float | None) -> None:
        self.problem = f"job queue unreachable: {exc}"
        self.metrics.ready(False)
        when = f"retrying in {retry_s:g} s" if retry_s is not None else "left for redelivery"
        log.warning("%s; %s", self.problem, when)

    def _reachable(self) -> None:
        if self.problem is not None:
            log.info("job queue reachable again")
            self.problem = None
            if self.generator.ready:
                self.metrics.ready(True)

    # -- shutdown ----------------------------------------------------------------------------

    def stop_pulling(self) -> None:
        self._pulling = False
        self._room.set()

    async def finish(self, timeout_s: float) -> None:
        """After the batcher drained: waits up to `timeout_s` for held jobs to be stored and
        acknowledged; the rest stay pending for another worker."""
        self.stop_pulling()
        if self._loop is not None:
            # A pull blocks up to `block_s`. Cancelling one in flight is harmless in memory but
            # could strand a Redis delivery until the visibility timeout: let it return.
            patience = 0.0 if self.settings.queue == "memory" else self.block_s + 1
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._loop), patience)
            self._loop.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout_s))
        await self.stop()
        # A clean stop leaves no consumer name behind in a shared queue (jobs still held stay
        # pending under it for another worker; the name goes once they are claimed).
        try:
            await self.queue.leave(self.consumer)
        except Exception as exc:  # the stop goes on: a dead consumer is swept by the others
            log.warning("could not remove consumer %s from the job queue: %s", self.consumer, exc)

    async def stop(self) -> None:
        self.stop_pulling()
        tasks = [*self._tasks, *(t for t in (self._loop, self._heartbeat) if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _persist(step: Callable[[], Awaitable[T]], tries: int = 5) -> T:
    """Retries a step whose loss would waste a generated image, with backoff (0.5 s -> 4 s)."""
    for attempt in range(tries):
        try:
            return await step()
        except BackendUnavailable as exc:
            if attempt == tries - 1:
                raise
            log.warning("job backend unreachable (%s); retrying", exc)
            await asyncio.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")
