"""The running server's resources and lifecycle: engine, batch loop, encoders, readiness, drain.

No HTTP here: `app` turns requests into `submit` calls and outcomes into responses.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from . import __version__, tenants
from .batcher import Batcher, Outcome
from .encode import encode
from .engines import (
    BatchKey,
    Engine,
    GenerationItem,
    StepState,
    key_label,
    load_engine,
    run_round,
    step_engine,
    warm_steps,
)
from .engines.capabilities import image_inputs
from .engines.families import served_samplers, served_sizes
from .engines.lora import LoraLibrary, LoraUnavailable
from .engines.protocol import PreviewsSteps, exact, reports_steps
from .errors import (
    BatchServeError,
    Draining,
    EngineHung,
    GenerationFailed,
    NotReady,
    NotServedHere,
    RateLimited,
    TenantQueueFull,
    ValidationError,
)
from .jobs.backends import open_queue, open_store
from .jobs.protocol import BackendUnavailable
from .jobs.runner import JobRunner
from .jobs.service import JobService
from .jobs.webhooks import WebhookSender
from .logs import KNOWN_PROMPTS
from .metrics import Metrics
from .progress import BATCH, Progress, ProgressBoard
from .sched.adaptive import Adaptive
from .sched.request_queue import QueueLoop
from .sched.waiting_room import WaitingRoom
from .sched.watchdog import Watchdog
from .schema import Limits
from .settings import Settings, SettingsError
from .stepper import Advanced, StepBatcher
from .worker import Worker

if TYPE_CHECKING:
    from PIL.Image import Image

    from .jobs.protocol import JobQueue, ResultStore
    from .schema import T2IRequest

log = logging.getLogger("batchserve")
T = TypeVar("T")
EngineFactory = Callable[[Settings], Engine]

DEMO_WARNING = (
    "--model tiny is a RANDOM-WEIGHT demo model: images are noise. It exists so the whole "
    "server runs offline on a CPU. Serve a real checkpoint with --model PATH_OR_HUB_ID, e.g. "
    "`batchserve serve --model stable-diffusion-v1-5/stable-diffusion-v1-5` or "
    "`--model ./model.safetensors` on a CUDA machine."
)


class Service:
    """One process's work in its `--role`: `all` (HTTP and generation), `api` (HTTP and jobs,
    no model: nothing here imports torch) or `worker` (model and job runner).

    `queue` and `store` replace the backends the settings name (tests inject them)."""

    STARTING, READY, DRAINING, FAILED = "starting", "ready", "draining", "failed"

    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: EngineFactory = load_engine,
        queue: JobQueue | None = None,
        store: ResultStore | None = None,
        webhooks: WebhookSender | None = None,
    ) -> None:
        self.settings = settings
        self.role = settings.role
        self.state = self.STARTING
        self.engine: Engine | None = None
        # The family's sizes from the settings alone: a `--role api` process loads no model.
        self.sizes = served_sizes(settings.model, settings.model_family, settings.model_config)
        # ... and its samplers (a flow-matching model's are not SD's); a --scheduler it cannot
        # use stops the start here, naming the flag.
        self.samplers, self.default_sampler = served_samplers(
            settings.model, settings.scheduler, settings.model_family, settings.model_config)
        # Per-request LoRA: the folder is listed here (names are checked at every door); the
        # engine judges each file against the model once loaded (`use_loras`).
        self.loras = (LoraLibrary(Path(settings.lora_dir), rescan_s=settings.lora_rescan_s)
                      if settings.lora_dir else None)
        self.limits = Limits(
            settings.max_pixels, settings.max_steps, settings.request_timeout_s,
            max_priority=settings.max_priority, max_cost=settings.max_cost,
            default_sampler=self.default_sampler, samplers=self.samplers,
            max_input_pixels=settings.max_input_pixels,
            image_inputs=image_inputs(settings), size_multiple=self.sizes.multiple_of,
            default_size=self.sizes.default, refiner=settings.refiner is not None,
            max_loras=settings.max_loras_per_request,
            lora_problem=self.loras.problem if self.loras is not None else None,
        )
        try:
            self.tenants = tenants.Tenants.from_settings(settings.api_keys, settings.api_key)
        except tenants.TenantsError as exc:
            raise SettingsError(f"--api-keys: {exc}") from None
        self.metrics = Metrics(settings.max_batch_size,
                               self.tenants.names if self.tenants is not None else ())
        self.worker = Worker("batchserve-engine")
        # Set at stop: the engine's running call ends at its next step (see `stop`).
        self.stopping = threading.Event()
        self.watchdog = Watchdog(factor=settings.watchdog_factor, min_s=settings.watchdog_min_s)
        self.encoder = ThreadPoolExecutor(settings.encode_workers, thread_name_prefix="encode")
        # Requests' init images are decoded here, off the loop: as many at once as images are
        # encoded, which bounds the memory that decoding untrusted uploads can take.
        self.decoder = ThreadPoolExecutor(settings.encode_workers, thread_name_prefix="decode")
        self.lora_reader = ThreadPoolExecutor(1, thread_name_prefix="lora-read")
        self._reports_steps = False  # the engine's generate takes on_step (set at load)
        self.continuous = settings.flush_policy == "continuous"
        wait_s = 0.0 if settings.flush_policy == "eager" else settings.max_wait_s
        self.adaptive = Adaptive(
            max_batch_size=settings.max_batch_size, enabled=settings.adaptive_batch == "on",
            label=shape_label, hooks=self.metrics,
        )
        options: dict[str, Any] = {
            "max_batch_size": settings.max_batch_size, "max_wait_s": wait_s,
            "max_queue": settings.max_queue, "aging_s": settings.priority_aging_s,
            "hooks": self.metrics, "key_label": shape_label,
        }
        self.batcher: QueueLoop[QueuedItem, asyncio.Future[bytes]] = (
            StepBatcher(EngineSteps(self), drop_late=settings.adaptive_batch == "on",
                        **options) if self.continuous
            else Batcher(self._run_batch, adaptive=self.adaptive, **options)
        )
        self.waiting_room = WaitingRoom(hold_s=settings.refusal_hold_s,
                                        max_held=settings.refusal_hold_max, hooks=self.metrics)
        if self.tenants is not None:
            self.batcher.queue.fair.weight = self.tenants.weight
        if webhooks is None and settings.webhook_secret and settings.webhook_hosts():
            webhooks = WebhookSender(settings.webhook_secret, settings.webhook_hosts(),
                                     allow_private=settings.webhook_allow_private)
        self.jobs = JobService(
            settings, self.metrics, queue or open_queue(settings), store or open_store(settings),
            admit=self.check_accepting_jobs, webhooks=webhooks,
        )
        self.progress = ProgressBoard(preview_every=settings.preview_every)
        self.jobs.progress_source = self.progress.get  # `progress` webhooks of jobs run here
        self.runner = (JobRunner(self, self.jobs, settings, self.metrics)
                       if self.role != "api" else None)
        self.jobs.runner = self.runner
        self.on_fatal: Callable[[str], None] = lambda reason: None
        self._engine_factory = engine_factory
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        self._settled = asyncio.Event()
        self.running: tuple[int, float] | None = None  # (items, monotonic start) of the batch
        self.last_batch_s: float | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts loading in the background so /healthz and /readyz answer while it loads."""
        self.metrics.ready(False)
        if self.role == "api":  # no model: ready once started (readiness also pings backends)
            self.state = self.READY
            self.metrics.ready(True)
            self._settled.set()
            return
        if self.settings.queue != "memory":  # api processes elsewhere stream our jobs' steps
            self.progress.mirror = self._mirror_progress(asyncio.get_running_loop())
        loop_task = asyncio.create_task(self.batcher.run(), name="batch-loop")
        loop_task.add_done_callback(self._loop_ended)
        self._tasks = [loop_task, asyncio.create_task(self._load(), name="load-model")]
        if self.runner is not None:
            self.runner.start()

    async def _load(self) -> None:
        settings = self.settings
        try:
            engine = await self.worker.run(partial(self._engine_factory, settings))
            info = engine.info()
            for switch in info.tuning:
                log.info("tuning %s: %s (%s)", switch.name, "on" if switch.enabled else "off",
                         switch.detail)
            if info.demo and settings.model == "tiny":
                log.warning(DEMO_WARNING)
            if self.continuous and step_engine(engine) is None:
                raise SettingsError(
                    f"--flush-policy=continuous: the engine of --model={settings.model} has no "
                    "step-wise interface (prepare/step/finish); use --flush-policy=deadline "
                    "or eager"
                )
            if self.loras is not None:
                use = getattr(engine, "use_loras", None)
                if use is None:
                    raise SettingsError(f"--lora-dir: the engine of --model={settings.model} "
                                        "cannot apply per-request LoRA")
                await self.worker.run(partial(use, self.loras, self.metrics))
            warmup_started = time.monotonic()
            timings = await self.worker.run(self._warmup_call(engine, info.device))
            # The first prediction the watchdog bounds batches by (lenient: it includes the
            # one-time costs of first calls).
            self.watchdog.measured(self._warmup_work(info.device),
                                   time.monotonic() - warmup_started)
            for key, seconds in (timings or {}).items():
                self.adaptive.seed(key, 1, seconds)
        except Exception as exc:
            # A bad setting or model file is the operator's to fix and its message says how; a
            # traceback would only bury it. Anything else keeps its traceback.
            log.error("model %r failed to load: %s", settings.model, exc,
                      exc_info=not isinstance(exc, SettingsError))
            self._fail(f"model failed to load: {type(exc).__name__}: {exc}")
            self._settled.set()
            return
        self.engine = engine
        self._reports_steps = reports_steps(engine)
        if self.state == self.STARTING:
            self.state = self.READY
            self.metrics.ready(True)
            log.info("ready in %.1f s: %s on %s (%s), batches of up to %d, max wait %g ms",
                     time.monotonic() - self._started, settings.model, info.device, info.dtype,
                     settings.max_batch_size, self.batcher.max_wait_s * 1000)
        self._settled.set()

    def _mirror_progress(self, loop: asyncio.AbstractEventLoop
                         ) -> Callable[[str, Progress], None]:
        """Copies jobs' progress into the shared queue backend (engine thread -> loop), at
        most every `MIRROR_EVERY_S` per job (and always its last step): a few small writes a
        second per running job, whatever the step rate."""
        written: dict[str, float] = {}
        queue = self.jobs.queue

        def mirror(key: str, progress: Progress) -> None:
            if key == BATCH:
                return
            last = written.get(key, 0.0)
            if progress.at - last < MIRROR_EVERY_S and progress.step < progress.steps:
                return
            written[key] = progress.at
            if progress.step >= progress.steps:
                written.pop(key, None)
            loop.call_soon_threadsafe(self._spawn, queue.put_progress(key, progress))

        return mirror

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        task.add_done_callback(_quiet)

    @property
    def ready(self) -> bool:
        return self.state == self.READY

    async def wait_loaded(self) -> str:
        """Waits until loading ended (ready or failed); returns the state."""
        await self._settled.wait()
        return self.state

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.critical("batch loop died", exc_info=task.exception())
        self.batcher.fail_all(GenerationFailed("the batch loop stopped; the server is restarting"))
        self._fail("batch loop died")

    def _engine_hung(self, error: EngineHung) -> None:
        """The engine thread is stuck in a call that cannot be interrupted: answer everything
        queued and in flight now, and end the process like a dead batch loop does."""
        log.critical("engine hung: %s", error.message)
        self.batcher.close()
        self.batcher.fail_all(error)
        self._fail("the engine hung")

    def _warmup_call(self, engine: Engine, device: str) -> Callable[[], Any]:
        """The engine's own warm-up of `generate`, or under `continuous` the same shapes and
        sizes through the step-wise calls (the only ones that policy makes)."""
        steps = step_engine(engine) if self.continuous else None
        if steps is None:
            return engine.warmup

        settings = self.settings

        def warm() -> None:
            sizes = settings.warmup_batch_sizes_on(device)
            for w, h, n, size, seconds in warm_steps(steps, settings.warmup_shapes(), sizes,
                                                     settings.scheduler):
                log.info("warm-up %dx%dx%d step-wise at %d items took %.2f s", w, h, n, size,
                         seconds)

        return warm

    def _warmup_work(self, device: str) -> int:
        sizes = self.settings.warmup_batch_sizes_on(device)
        return sum(w * h * steps * n for w, h, steps in self.settings.warmup_shapes()
                   for n in sizes)

    def _fail(self, reason: str) -> None:
        self.state = self.FAILED
        self.metrics.ready(False)
        self.on_fatal(reason)

    async def drain(self) -> bool:
        """Stops admitting, finishes queued and in-flight work within `drain_timeout_s`."""
        if self.state != self.FAILED:
            self.state = self.DRAINING
        self.metrics.ready(False)
        log.info("draining: %d queued, grace period %g s", self.batcher.depth,
                 self.settings.drain_timeout_s)
        started = time.monotonic()
        if self.runner is not None:
            self.runner.stop_pulling()
        finished = await self.batcher.drain(self.settings.drain_timeout_s)
        if not finished:
            log.warning("drain grace period ended; unfinished requests answered 503")
        if self.runner is not None:
            # Storing finished images is quick; what is left after that goes back to the queue.
            left = self.settings.drain_timeout_s - (time.monotonic() - started)
            await self.runner.finish(max(left, 5.0))
        self.jobs.stop_waiting()
        return finished

    def end_drain(self) -> None:
        """Cuts the drain short: everything queued or in flight is answered 503 now."""
        self.batcher.fail_all(Draining("server shut down before this request could run"))

    async def stop(self) -> None:
        if not self.batcher.closed:
            self.batcher.close()
        self.batcher.fail_all(Draining("server stopped before this request could run"))
        if self.runner is not None:
            await self.runner.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.jobs.close()
        await self._stop_engine()
        self.encoder.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)
        self.lora_reader.shutdown(wait=False, cancel_futures=True)

    async def _stop_engine(self) -> None:
        """Interrupts the engine between two steps and waits for its thread to end, so no
        native code runs when the interpreter exits (that aborts the process with SIGABRT).
        A batch nobody waits for any more (its clients left) may still be running after the
        drain. A hung engine is the watchdog's case: the process then exits non-zero without
        waiting (see `server.run`)."""
        self.stopping.set()
        self.worker.stop()
        if self.state == self.FAILED and not self.worker.join(0):
            return
        bound_s = max(self.settings.drain_timeout_s, 5.0)
        if not await asyncio.to_thread(self.worker.join, bound_s):
            log.critical("the engine thread did not stop within %g s", bound_s)
            self._fail("engine thread did not stop")

    async def readiness(self) -> str | None:
        """None when this role can do its work now, else why not (`/readyz`). api: the queue
        and the store answer; worker: model warm and the queue answers; all: both."""
        if self.state != self.READY:
            return f"server is {self.state}"
        if self.runner is not None and self.runner.problem is not None:
            return self.runner.problem
        return await self.jobs.check_backends(store=self.role != "worker")

    # -- requests --------------------------------------------------------------------------

    def check_admitting(self) -> None:
        """For the doors that generate while the client waits (`/t2i` and its translations):
        only `--role all` serves them."""
        if self.role == "api":
            raise NotServedHere(
                "this --role api process loads no model and does not generate while you wait; "
                "submit an async job with POST /v1/jobs, or call a --role all server"
            )
        if self.role == "worker":
            raise NotServedHere("this is a --role worker process; send requests to the api")
        self._check_state()

    def reload_tenants(self) -> bool:
        """SIGHUP: re-reads `--api-keys`; queued work keeps running, a bad file is logged and
        the tenants in force stay."""
        if self.tenants is None or not self.tenants.reload():
            return False
        self.metrics.set_tenants(self.tenants.names)
        return True

    async def admit_tenant(self, images: int, priority: int) -> None:
        """The current request's tenant (`tenants.CURRENT`) may queue `images` more images at
        `priority`: within its `max_priority` (422), `max_queued` (429 `tenant_queue_full`;
        its requests queued and running here and its jobs still queued count) and
        `images_per_minute` (429 `rate_limited`). Called by the doors before anything is
        queued or stored."""
        table = self.tenants
        tenant = table.get(tenants.CURRENT.get()) if table is not None else None
        if table is None or tenant is None:
            return
        top = tenant.max_priority
        if top is not None and priority > top:
            raise ValidationError(f"priority above {top}, this API key's max_priority",
                                  field="priority")
        limit = tenant.max_queued if tenant.max_queued is not None else self.settings.max_queue
        queued = self.batcher.queue.queued_by(tenant.name)
        if queued + images <= limit:  # the job queue is asked only when it can matter
            queued += await self._jobs_waiting_by(tenant.name)
        if queued + images > limit:
            self.metrics.tenant_refused(tenant.name, "tenant_queue_full")
            raise TenantQueueFull(
                f"this API key already has {queued} images queued (max_queued {limit})",
                retry_after_s=self.batcher.retry_after_s())
        wait_s = table.rates.try_take(tenant, images)
        if wait_s > 0:
            self.metrics.tenant_refused(tenant.name, "rate_limited")
            raise RateLimited(
                f"over this API key's images_per_minute ({tenant.images_per_minute:g})",
                retry_after_s=tenants.retry_after(wait_s))
        self.metrics.tenant_admitted(tenant.name, images)

    async def _jobs_waiting_by(self, tenant: str) -> int:
        """The tenant's jobs still queued (on every api process for a shared queue; a job a
        runner has just handed to this process's queue may count twice for that moment). A
        job backend that cannot answer counts none: /t2i does not depend on it, and a job
        submit fails on its own."""
        try:
            return await self.jobs.queue.waiting_by(tenant)
        except BackendUnavailable:
            return 0

    def check_accepting_jobs(self) -> None:
        """For the jobs door: `--role all` and `--role api`."""
        if self.role == "worker":
            raise NotServedHere("this is a --role worker process; send jobs to the api")
        self._check_state()

    def _check_state(self) -> None:
        if self.state == self.DRAINING:
            raise Draining("server is shutting down; retry on another instance", retry_after_s=5)
        if self.state != self.READY:
            raise NotReady(f"server is {self.state}; model not ready", retry_after_s=5)

    async def prefetch_loras(self, requests: Sequence[T2IRequest]) -> None:
        """Reads the requests' LoRA files onto the device before they are queued, on a thread
        of their own: the engine keeps running other batches meanwhile, and finds the adapters
        ready when their items run. A file gone since validation is a 422 here."""
        names = sorted({pick.name for r in requests for pick in r.loras})
        runtime = getattr(self.engine, "lora", None)
        if not names or runtime is None:
            return
        loop = asyncio.get_running_loop()
        for name in names:
            try:
                await loop.run_in_executor(self.lora_reader, runtime.prefetch, name)
            except LoraUnavailable as exc:
                raise ValidationError(f"loras: {exc}", field="loras") from None

    def submit(
        self, request: T2IRequest, fmt: str = "png", *, online: bool = True,
        progress_key: str | None = None,
    ) -> asyncio.Future[Outcome[asyncio.Future[bytes]]]:
        """Queues one request; its outcome's result is a future of the encoded image. A worker's
        job runner submits too (roles all and worker), with `online=False`: nobody holds a
        connection open for a job, so the learned patience of clients neither budgets it nor
        learns from its cancellation."""
        if self.role == "worker":
            if self.state != self.READY:
                raise Draining("worker is not accepting jobs", retry_after_s=5)
        else:
            self.check_admitting()
        queued = QueuedItem(request.item(), fmt, progress_key=progress_key)
        # Under `continuous` items of any steps and guidance share steps: the key is the shape.
        key: Hashable = (request.width, request.height) if self.continuous else request.key
        if request.loras and self.settings.lora_batching == "split":
            key = (key, tuple((p.name, p.scale) for p in request.loras))
        future = self.batcher.submit(
            queued, key=key, priority=request.priority, timeout_s=request.timeout_s,
            explicit_timeout=request.timeout_given or not online, tenant=tenants.CURRENT.get(),
        )
        queued.outcome = future
        if progress_key is not None:  # generated (or not): its progress is no longer news
            future.add_done_callback(lambda _: self.progress.drop(progress_key))
        self.metrics.admitted()
        if not self.settings.log_prompts:
            # Known to the log's prompt filter until answered (and while generating, below).
            KNOWN_PROMPTS.add(*queued.texts)
            future.add_done_callback(lambda _: KNOWN_PROMPTS.remove(*queued.texts))
        return future

    async def _run_batch(self, batch: list[QueuedItem]) -> list[asyncio.Future[bytes]]:
        engine = self.engine
        if engine is None:  # cannot happen: submit requires READY
            raise RuntimeError("engine not loaded")
        batch_stop = self.batcher.should_stop()  # of the part about to run
        stopping = self.stopping.is_set

        def should_stop() -> bool:
            return batch_stop() or stopping()

        texts = [t for q in batch for t in q.texts]
        KNOWN_PROMPTS.add(*texts)  # a client leaving mid-batch must not unmask its prompt
        progress = ({"on_step": partial(self.progress.batch_stepped,
                                        [q.progress_key for q in batch])}
                    if self._reports_steps else {})
        call = self.worker.run(
            partial(engine.generate, [q.item for q in batch], should_stop=should_stop,
                    **progress)
        )
        started = time.monotonic()
        self.running = (len(batch), started)
        self.waiting_room.opened()  # the batch left the queue: places freed
        try:
            images = await self.watchdog.guard(call, sum(_work(q.item) for q in batch))
        except EngineHung as exc:
            self._engine_hung(exc)
            raise
        finally:
            KNOWN_PROMPTS.remove(*texts)
            self.last_batch_s = time.monotonic() - started
            self.running = None
            self.progress.drop(BATCH)
            self.waiting_room.opened()
        self.metrics.gpu_memory(engine.memory_bytes())
        return self._encode_all(images, batch)

    def steps_reporter(self, queued: list[QueuedItem]
                       ) -> Callable[[Sequence[StepState]], None]:
        """For `continuous`: each step of the running batch (`run_round`'s `after_step`,
        engine thread), its states in the order of `queued`."""
        board, engine = self.progress, self.engine
        previews = engine if isinstance(engine, PreviewsSteps) else None

        def preview_of(state: StepState) -> Callable[[], bytes | None] | None:
            return None if previews is None else partial(previews.preview, state)

        def stepped(states: Sequence[StepState]) -> None:
            furthest: tuple[float, int, int, StepState] | None = None
            for q, state in zip(queued, states, strict=False):
                total = q.item.inference_steps - q.item.start_step
                done = max(0, total - state.remaining)
                if furthest is None or done / max(1, total) > furthest[0]:
                    furthest = (done / max(1, total), done, total, state)
                if q.progress_key is not None:
                    board.report(q.progress_key, done, total, preview_of(state))
            if all(state.done for state in states):
                board.drop(BATCH)  # the batch emptied (joiners make the next one's)
            elif furthest is not None:
                _, done, total, state = furthest
                board.report(BATCH, done, total, preview_of(state))

        return stepped

    def _encode_all(self, images: list[Image], batch: list[QueuedItem]
                    ) -> list[asyncio.Future[bytes]]:
        """Encodes a batch in at most `encode_workers` pool jobs, one thread hop each rather
        than one per image, while the engine already runs the next batch. Images of clients
        who left during the batch are not encoded (their futures are cancelled)."""
        loop = asyncio.get_running_loop()
        out: list[asyncio.Future[bytes]] = [loop.create_future() for _ in images]
        wanted = [i for i, queued in enumerate(batch) if queued.wanted]
        for i in set(range(len(images))) - set(wanted):
            out[i].cancel()
        chunks = min(self.settings.encode_workers, len(wanted))
        level = self.settings.png_compress_level
        for c in range(chunks):
            picked = wanted[c::chunks]
            work = partial(_encode_many, [(images[i], batch[i].fmt) for i in picked], level)
            done = loop.run_in_executor(self.encoder, work)
            done.add_done_callback(partial(self._fan_out, [out[i] for i in picked]))
        return out

    def _fan_out(
        self,
        futures: list[asyncio.Future[bytes]],
        chunk: asyncio.Future[list[bytes | Exception]],
    ) -> None:
        """Hands each encoded image to its request. An image counts when encoded; a failed
        encode is that request's one outcome (`failed`), answered as a clean 500."""
        for i, future in enumerate(futures):
            if future.done():
                continue
            if chunk.cancelled():
                future.cancel()
                continue
            encoded = chunk.result()[i]
            if isinstance(encoded, bytes):
                future.set_result(encoded)
                self.metrics.image()
            else:
                log.error("encoding an image failed", exc_info=encoded)
                future.set_exception(BatchServeError("encoding the image failed; see the log"))
                self.metrics.rejected("failed")

    def live(self) -> dict[str, Any]:
        """What is happening now: for the page's status line and A1111's `/progress`."""
        running = self.running
        images = self.metrics.registry.get_sample_value("batchserve_images_total")
        return {
            "queue_depth": self.batcher.depth,
            "running_batch_size": running[0] if running else 0,
            "running_for_s": round(time.monotonic() - running[1], 3) if running else 0.0,
            "last_batch_s": self.last_batch_s,
            "images_total": int(images or 0),
            # the running batch's furthest item (steps only: this route is open, previews
            # of others' images are not)
            "progress": None if (now := self.progress.get(BATCH)) is None else now.to_dict(),
        }

    def lora_listing(self) -> dict[str, Any]:
        """`--lora-dir`'s files as requests may name them, and which are resident now."""
        if self.loras is None:
            return {"enabled": False, "loras": [], "resident": []}
        runtime = getattr(self.engine, "lora", None)
        resident = runtime.resident_names() if runtime is not None else []
        return {
            "enabled": True, "max_per_request": self.settings.max_loras_per_request,
            "loras": [{**e.describe(), "resident": name in resident}
                      for name, e in self.loras.entries().items()],
            "resident": resident,
        }

    def info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "version": __version__,
            "state": self.state,
            "role": self.role,
            "jobs": {
                "queue": s.queue.partition("://")[0],
                "results": s.results.partition("://")[0],
                "result_redirect": s.result_redirect,
                "job_ttl_s": s.job_ttl_s,
                "webhooks": self.jobs.webhooks is not None,
            },
            "engine": self.engine.info().to_dict() if self.engine else None,
            "sizes": self.sizes.to_dict(s.max_pixels),
            "loras": {key: value for key, value in self.lora_listing().items()
                      if key != "loras"},
            "batching": {
                "key": ["width", "height"] if self.continuous else
                       ["width", "height", "inference_steps", "guidance_scale", "sampler",
                        "start_step", *(["refiner_switch"] if self.limits.refiner else [])],
                "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_ms,
                "flush_policy": s.flush_policy,
                "priority_aging_s": s.priority_aging_s,
                "max_queue": s.max_queue,
                "queue_depth": self.batcher.depth,
                "adaptive_batch": s.adaptive_batch,
                "keys": self.adaptive.snapshot(time.monotonic()),
                "size_limits": {
                    shape_label(k): n for k, n in self.batcher.sizes.learned().items()
                },
            },
            "limits": {
                "max_pixels": s.max_pixels,
                "max_steps": s.max_steps,
                "max_cost": s.max_cost,
                "max_priority": s.max_priority,
                "max_body_bytes": s.max_body_bytes,
                "max_image_bytes": s.max_image_bytes,
                "max_input_pixels": s.max_input_pixels,
                "request_timeout_s": s.request_timeout_s,
                "drain_timeout_s": s.drain_timeout_s,
            },
            "samplers": {"served": list(self.samplers), "default": self.default_sampler},
            "image_inputs": sorted(self.limits.image_inputs),
            "live": self.live(),
            "watchdog": {
                "factor": s.watchdog_factor,
                "min_s": s.watchdog_min_s,
                "seconds_per_megapixel_step": (
                    None if self.watchdog.rate_s is None else self.watchdog.rate_s * 1e6
                ),
            },
            "auth": {
                "t2i": self.tenants is not None,
                "metrics": bool(self.tenants is not None and s.protect_metrics),
            },
        }


class EngineSteps:
    """The engine's step-wise interface for `StepBatcher`: on the one engine thread, each call
    bounded by the watchdog like a whole batch (a step's work is its items' pixels)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self._checked: tuple[object, Any] | None = None  # (engine, as StepEngine)

    def _engine(self) -> Any:
        # The runtime protocol check is slow next to a step: once per loaded engine.
        engine = self.service.engine
        if self._checked is None or self._checked[0] is not engine:
            steps = step_engine(engine)
            if steps is None:  # cannot happen: loading refuses such an engine under this policy
                raise RuntimeError("engine has no step-wise interface")
            self._checked = (engine, steps)
        return self._checked[1]

    async def _guarded(self, call: Callable[[], T], work: float,
                       done_work: Callable[[T], float] | None = None, *,
                       items: list[GenerationItem]) -> T:
        """`items`: those the call works on, whose prompts stay known to the log's filter for
        the call's length, as `_run_batch` does for a whole batch: a client that leaves
        mid-call removes its prompts at once, while the engine thread may still log them."""
        service = self.service
        texts = [t for i in items for t in (i.prompt, i.negative_prompt)]
        KNOWN_PROMPTS.add(*texts)
        try:
            return await service.watchdog.guard(service.worker.submit(call), work, done_work)
        except EngineHung as exc:
            service._engine_hung(exc)
            raise
        finally:
            KNOWN_PROMPTS.remove(*texts)

    async def advance(self, joining: list[QueuedItem], active: list[tuple[QueuedItem, StepState]],
                      until: Callable[[], bool] | None = None,
                      finishing: list[tuple[QueuedItem, StepState]] | None = None,
                      hold: int = 0, ahead: list[QueuedItem] | None = None,
                      ) -> Advanced[asyncio.Future[bytes]]:
        """Join, steps and decode of one iteration in one engine-thread call (`run_round`):
        steps go on until an item is done or `until()`; the done and the held `finishing`
        are decoded together once there are `hold`. The watchdog bounds the call by the
        most steps it can run (until the first item's schedule ends) and learns from the
        steps it ran."""
        finishing = finishing or []
        engine = self._engine()
        if until is not None:  # the server stopping ends the round at the next step too
            wanted, stopping = until, self.service.stopping.is_set
            until = lambda: stopping() or wanted()  # noqa: E731
        items = [q.item for q in joining]
        states = [s for _, s in active]
        held = [s for _, s in finishing]
        pixels = sum(i.width * i.height for i in [*items, *(s.item for s in [*states, *held])])
        most = 1 if until is None else min(
            [*(s.remaining for s in states), *(i.inference_steps for i in items)], default=1)
        reporter = self.service.steps_reporter([*(q for q, _ in active), *joining])
        ran = await self._guarded(partial(run_round, engine, items, states, until, reporter,
                                          held, hold, [q.item for q in ahead or ()]),
                                  pixels * max(1, most), lambda r: pixels * max(1, r.steps),
                                  items=[*items, *(s.item for s in [*states, *held])])
        self.service.waiting_room.opened()  # joiners left the queue, finished items the batch
        out: Advanced[asyncio.Future[bytes]] = Advanced(
            ran.joined, ran.join_error, ran.steps, ran.step_error, None, ran.finish_error)
        if ran.images is not None:
            self.service.metrics.gpu_memory(engine.memory_bytes())
            stepped = [*active, *zip(joining, ran.joined or (), strict=False)]
            out.finished = self.service._encode_all(
                ran.images, [*(q for q, _ in finishing), *(q for q, s in stepped if s.done)])
        return out

    async def prepare(self, joining: list[QueuedItem]) -> list[StepState]:
        states: list[StepState] = await self._guarded(
            partial(self._engine().prepare, [q.item for q in joining]), 0,
            items=[q.item for q in joining])
        return states

    async def step(self, states: list[StepState]) -> None:
        work = sum(s.item.width * s.item.height for s in states)
        await self._guarded(partial(self._engine().step, states), work,
                            items=[s.item for s in states])

    async def finish(self, pairs: list[tuple[QueuedItem, StepState]]
                     ) -> list[asyncio.Future[bytes]]:
        engine = self._engine()
        images = await self._guarded(partial(engine.finish, [s for _, s in pairs]), 0,
                                     items=[s.item for _, s in pairs])
        self.service.metrics.gpu_memory(engine.memory_bytes())
        return self.service._encode_all(images, [q for q, _ in pairs])

    def done(self, state: StepState) -> bool:
        return state.done

    def remaining(self, state: StepState) -> int:
        return state.remaining


@dataclass(eq=False, slots=True)
class QueuedItem:
    """What the batcher queues for one image: the engine's item and the format its client
    wants. (An async job of `jobs/` becomes one of these when a worker runs it.)"""

    item: GenerationItem
    fmt: str
    outcome: asyncio.Future[Any] | None = None  # the batcher's future, once queued
    progress_key: str | None = None  # a job's id: its steps go to the progress board

    @property
    def wanted(self) -> bool:
        """False once its client left (the outcome was cancelled)."""
        return self.outcome is None or not self.outcome.cancelled()

    @property
    def texts(self) -> tuple[str, str]:
        return self.item.prompt, self.item.negative_prompt


MIRROR_EVERY_S = 0.25


def _quiet(task: asyncio.Future[None]) -> None:
    """Progress is best effort: a failed write is dropped, not logged per step."""
    if not task.cancelled():
        task.exception()


def _work(item: GenerationItem) -> int:
    """What the watchdog predicts an item's engine time from: pixels x steps."""
    return item.width * item.height * item.inference_steps


def shape_label(key: Hashable) -> str:
    """A batching key as a metric label and /v1/info key, e.g. `512x512x20x7.5/euler-a` or,
    for items joining at step 5, `512x512x20x7.5@5/euler-a`, with the refiner
    `1024x1024x30x7.5+refiner@0.8/euler-a` (as the request log writes it):
    numbers and names from closed sets only, never user text."""
    if not isinstance(key, tuple):
        return "other"
    if len(key) == 2 and isinstance(key[0], tuple) and isinstance(key[1], tuple):
        return shape_label(key[0]) + "+lora"  # `--lora-batching split`: one label for all sets
    if len(key) in (5, 6, 7) and isinstance(key[4], str) and key[4]:
        return key_label(cast(BatchKey, key))  # the whole-batch key
    numbers = "x".join(exact(p) if isinstance(p, float) else str(p) for p in key
                       if not isinstance(p, str))
    return "/".join([numbers, *(p for p in key if isinstance(p, str))])


def _encode_many(
    pairs: list[tuple[Image, str]], png_compress_level: int
) -> list[bytes | Exception]:
    """One result per image: an image that cannot be encoded fails alone, not its chunk."""
    out: list[bytes | Exception] = []
    for image, fmt in pairs:
        try:
            out.append(encode(image, fmt, png_compress_level=png_compress_level))
        except Exception as exc:
            out.append(exc)
    return out
