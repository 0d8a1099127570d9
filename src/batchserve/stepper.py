"""The `continuous` flush policy: items join and leave a running batch between denoising steps.

Like `batcher.Batcher` it is a loop over the one `RequestQueue` (admission, purge, priority with
aging, drain are the queue's); what differs is the unit of work: one UNet step for the active
items of one shape (the key), not one whole batch. No HTTP, no torch: the engine is reached
through an async `StepRunner`.

Between two steps, in this order: cancelled items leave; queued items of the running key join,
highest aged priority first, up to the active limit; one step runs for all active items; items
whose schedule is done are decoded together and answered at once. A runner that offers
`advance` does join, steps and decode of one iteration in one call on the engine thread, and
keeps stepping while nothing changes (no item done, nothing submitted, cancelled or past its
deadline: `_until`), so the engine does not wait for the event loop between such steps;
otherwise `advance_in_parts` makes the three calls for one step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from .batcher import as_failure
from .errors import BatchServeError, EngineOutOfMemory, QueueTimeout
from .sched.request_queue import Clock, Hooks, Outcome, Pending, QueueLoop
from .sched.retry import Part, run_split

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("batchserve.stepper")

class StepRunner(Protocol[T, R]):
    """The engine's step-wise interface as the loop sees it (states are opaque)."""

    async def prepare(self, payloads: list[T]) -> list[Any]: ...

    async def step(self, states: list[Any]) -> None: ...

    async def finish(self, pairs: list[tuple[T, Any]]) -> list[R]:
        """One result per (payload, done state)."""
        ...

    def done(self, state: Any) -> bool: ...

    def remaining(self, state: Any) -> int:
        """Steps of the state's schedule still to run."""
        ...


class StepTimes:
    """The fastest step seen per shape: what an item's steps left take at the least.

    Only plain steps count (nobody joined, nobody finished: no prompt encoding, no decode in
    the timed call). The fastest over every active count is a lower bound whoever leaves the
    batch later, so a prediction from it says "cannot finish" only when even the best pace seen
    would not do."""

    def __init__(self) -> None:
        self._fastest: dict[Hashable, float] = {}

    def note(self, key: Hashable, seconds: float) -> None:
        if seconds > 0:
            self._fastest[key] = min(self._fastest.get(key, math.inf), seconds)

    def per_step(self, key: Hashable) -> float | None:
        return self._fastest.get(key)


@dataclass(eq=False, slots=True)
class Advanced(Generic[R]):
    """What one iteration did: each phase's result or its error. Later phases that depended on
    a failed one did not run; `finished` holds one result per stepped state that is done, in
    stepping order (the active items, then the joiners)."""

    joined: list[Any] | None = None  # the joiners' states; None when prepare failed
    join_error: Exception | None = None
    steps: int = 0  # steps that ran for every stepped state (a failed one not counted)
    step_error: Exception | None = None
    finished: list[R] | None = None
    """One result per decoded state: the held ones passed in (`finishing`), then the newly
    done in stepping order; None: nothing decoded (fewer than `hold` to decode)."""
    finish_error: Exception | None = None


@runtime_checkable
class AdvancingRunner(StepRunner[T, R], Protocol[T, R]):
    """A runner that does one iteration (prepare the joiners, step all, finish the done) in one
    call; `finish` stays for the smaller retries after a failed decode."""

    async def advance(self, joining: list[T], active: list[tuple[T, Any]],
                      until: Callable[[], bool] | None = None,
                      finishing: list[tuple[T, Any]] | None = None, hold: int = 0,
                      ahead: list[T] | None = None) -> Advanced[R]:
        """Steps go on while no state is done and `until()` is false (checked after each
        step, from the engine's thread); None: one step. Then `finishing` (done states held
        from earlier iterations) and the newly done are decoded together if there are at
        least `hold` of them. `ahead`: queued payloads likely to join soon, which the runner
        may prepare for (their prompts encoded together)."""
        ...


async def advance_in_parts(runner: StepRunner[T, R], joining: list[T],
                           active: list[tuple[T, Any]],
                           until: Callable[[], bool] | None = None,
                           finishing: list[tuple[T, Any]] | None = None, hold: int = 0,
                           ahead: list[T] | None = None) -> Advanced[R]:
    """`AdvancingRunner.advance` from the three separate calls, one step a call (`until` is
    not needed: the loop decides again after every step; `ahead` is not used)."""
    out: Advanced[R] = Advanced()
    if joining:
        try:
            out.joined = await runner.prepare(joining)
        except Exception as exc:
            out.join_error = exc
    pairs = [*active, *zip(joining, out.joined or (), strict=False)]
    if pairs:
        try:
            await runner.step([s for _, s in pairs])
        except Exception as exc:
            out.step_error = exc
            return out
        out.steps = 1
    done = [*(finishing or ()), *((p, s) for p, s in pairs if runner.done(s))]
    if done and len(done) >= hold:
        try:
            out.finished = await runner.finish(done)
        except Exception as exc:
            out.finish_error = exc
    return out


class _Suspended:
    """True once the running loop has run a callback scheduled at its creation, i.e. once the
    creator's task has suspended since. At saturation, after an engine call (which suspends
    while the engine works, so submissions and cancellations were let in meanwhile) the next
    round is taken at once: another pass through the loop's ready callbacks first (responses,
    new requests' parsing) would leave the engine idle for it once per round, i.e. once per
    finished item. Below saturation that pass comes first (latency wins there: the responses
    go out before the engine's threads take both cores again)."""

    __slots__ = ("_ran",)

    def __init__(self) -> None:
        self._ran = False
        asyncio.get_running_loop().call_soon(self._set)

    def _set(self) -> None:
        self._ran = True

    def __bool__(self) -> bool:
        return self._ran


@dataclass(eq=False, slots=True)
class Active(Generic[T, R]):
    """An item in the running batch, with what its response headers report."""

    pending: Pending[T, R]
    state: Any
    first_step: float | None = None
    steps: int = 0
    shared: int = 0  # sum over its steps of the items in that step

    @property
    def gone(self) -> bool:
        return self.pending.future.done()  # cancelled by its client, or failed by a drain

    def outcome(self, result: R, now: float) -> Outcome[R]:
        first = self.first_step if self.first_step is not None else now
        mean = round(self.shared / self.steps) if self.steps else 1
        return Outcome(result, max(1, mean), first - self.pending.enqueued, now - first)


class StepBatcher(QueueLoop[T, R]):
    """Runs the active items of one key a step at a time from the shared `RequestQueue`.

    Guarantees: a step never mixes keys and never holds more than the active limit
    (`max_batch_size`, lowered by `BatchSizes` after an out-of-memory step); a lone request
    starts at once; every taken item is answered exactly once. Another key is not starved: once
    its oldest item has waited `max_wait_s`, the running key stops admitting, and the other key
    runs as soon as the active items finish (at most `--max-steps` more steps).

    With `drop_late` (`--adaptive-batch on`), an active item whose steps left cannot end before
    its deadline even at the fastest step seen for its shape is answered 504 at once and leaves,
    rather than holding a slot until its timeout passes.
    """

    def __init__(
        self,
        runner: StepRunner[T, R],
        *,
        max_batch_size: int = 8,
        max_wait_s: float = 0.5,
        max_queue: int = 256,
        aging_s: float = 5.0,
        clock: Clock = time.monotonic,
        hooks: Hooks | None = None,
        key_label: Callable[[Hashable], str] = str,
        drop_late: bool = True,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, max_wait_s=max_wait_s,
                         max_queue=max_queue, aging_s=aging_s, clock=clock, hooks=hooks,
                         key_label=key_label)
        self._runner = runner
        self._advance: Callable[..., Awaitable[Advanced[R]]] = (
            runner.advance if isinstance(runner, AdvancingRunner)
            else partial(advance_in_parts, runner))
        self.active: list[Active[T, R]] = []
        self.held: list[Active[T, R]] = []
        """Done items whose decode waits to be batched with the next ones (`_hold`): out of
        the running batch (their slots taken by joiners), not answered yet."""
        self._ahead: set[int] = set()  # `seq` of queued items already sent `ahead`
        self.key: Hashable | None = None
        self.drop_late = drop_late
        self.times = StepTimes()
        self._saturated = False  # the last round ran at saturation (`_hold` > 1)

    def limit(self, key: Hashable) -> int:
        """The active limit of `key`: the setting, or less after a step of this key ran out of
        memory (`BatchSizes` learns it back up as steps at the limit fit)."""
        return min(self.max_batch_size, self.sizes.limit(key))

    async def run(self) -> None:
        """Steps until closed and empty. Exceptions inside a step never end it."""
        queue = self.queue
        while True:
            queue.wake.clear()
            queue.changed.clear()
            now = self._clock()
            queue.purge(now)
            self._expire_active(now)
            self._drop_gone()
            if queue.closed and queue.empty() and not self.held:
                return
            # The batch emptied with decodes held: those first, before another key runs.
            taken = [] if self.held and not self.active else self._take(now)
            if not self.active and not taken and not self.held:
                await queue.wait(queue.next_deadline())
                continue
            suspended = _Suspended()
            await self._iterate(taken, now)
            # Let clients, cancellations and submissions in before the next round, unless at
            # saturation the engine call already did (it suspends while the engine works)
            if not (suspended and self._saturated):
                await asyncio.sleep(0)

    # -- between steps ---------------------------------------------------------------------

    def _expire_active(self, now: float) -> None:
        """`timeout_s` bounds queue plus generation: an item past it is answered 504 and leaves
        at this step boundary, freeing its slot (its work so far is wasted, not finished). With
        `drop_late`, so is one that cannot finish in time: its slot goes to one that can."""
        per_step = self.times.per_step(self.key) if self.drop_late else None
        for item in self.active:
            why = None if item.gone else self._late(item, now, per_step)
            if why is not None:
                item.pending.future.set_exception(QueueTimeout(why))
                self._hooks.rejected("timeout")  # past it, or answered before it passes
                self._hooks.wasted("timeout")

    def _late(self, item: Active[T, R], now: float, per_step: float | None) -> str | None:
        """Why `item` cannot finish within its `timeout_s` (None: it still can)."""
        deadline = item.pending.deadline
        if deadline <= now:
            return (f"not finished {now - item.pending.enqueued:.1f} s after admission, past "
                    "its timeout_s")
        if per_step is None:
            return None
        left = self._runner.remaining(item.state)
        if now + left * per_step > deadline:
            return (f"cannot finish within its timeout_s: {left} steps left take at least "
                    f"{left * per_step:.1f} s, {deadline - now:.1f} s remain")
        return None

    def _drop_gone(self) -> None:
        gone = [a for a in self.active if a.gone]
        if not gone:
            return
        for item in gone:
            if item.pending.future.cancelled():
                self._hooks.rejected("cancelled")
                self._hooks.wasted("cancelled")
        self._leave(gone)

    def _leave(self, items: list[Active[T, R]]) -> None:
        ids = set(map(id, items))
        self.active = [a for a in self.active if id(a) not in ids]
        self.queue.release([a.pending for a in items])
        self._hooks.active_items(len(self.active))

    def _starved(self, now: float) -> bool:
        """Another key's oldest item waited `max_wait_s`: the running key stops admitting."""
        return any(k != self.key and now - g.oldest >= self.max_wait_s
                   for k, g in self.queue.groups.items())

    def _next_key(self, now: float) -> Hashable | None:
        """When idle: a key that waited `max_wait_s` other than the last one, else the best."""
        due = self.queue.best(now, lambda g: now - g.oldest >= self.max_wait_s
                              and g is not self.queue.groups.get(self.key))
        return due if due is not None else self.queue.best(now)

    def _take(self, now: float) -> list[Pending[T, R]]:
        """The queued items that join before the next step (none while another key starves)."""
        if self.active:
            if self._starved(now):
                return []
        else:
            self.key = self._next_key(now)
            if self.key is None:
                return []
        room = self.limit(self.key) - len(self.active)
        return self.queue.take(self.key, room, now) if room > 0 else []

    def _join(self, taken: list[Pending[T, R]], ran: Advanced[R], now: float
              ) -> list[Active[T, R]]:
        """The joiners enter the running batch (or fail / go back when prepare failed)."""
        if ran.joined is None:
            self._failed_to_start(taken, ran.join_error or RuntimeError("no states"), now)
            return []
        joined = [Active(p, s) for p, s in zip(taken, ran.joined, strict=True)]
        self.active += joined
        self._hooks.active_items(len(self.active))
        trigger = ("drain" if self.queue.closed else
                   "full" if len(self.active) >= self.limit(self.key) else "join")
        self._hooks.batch_started(len(joined), trigger, [now - p.enqueued for p in taken])
        return joined

    def _failed_to_start(self, taken: list[Pending[T, R]], exc: Exception, now: float) -> None:
        if isinstance(exc, EngineOutOfMemory) and self.active:
            self.sizes.out_of_memory(self.key, len(self.active) + len(taken))
            self.queue.requeue(taken)
            return
        self._fail(taken, exc)
        self.queue.release(taken)

    def _fail(self, items: list[Pending[T, R]], exc: BaseException) -> None:
        if not isinstance(exc, BatchServeError | EngineOutOfMemory):
            log.error("step batch of %d failed", len(items), exc_info=exc)
        for item in items:
            if not item.future.done():
                item.future.set_exception(as_failure(exc))
                self._hooks.rejected("failed")

    # -- one step --------------------------------------------------------------------------

    def _until(self, pending: list[Pending[T, R]], full: bool) -> Callable[[], bool]:
        """When steps running back to back must stop for the loop to decide again: something
        was submitted, cancelled or failed (the queue's wake is set), or an item's deadline
        passed. With no free slot (`full`) a submission changes nothing before an item is done
        (a newcomer could not join), so only the rest stops the run: at saturation every
        arrival would otherwise cost the engine a hop to the loop and back. Read from the
        engine's thread: an `asyncio.Event` flag and the clock."""
        flag, clock = (self.queue.changed if full else self.queue.wake), self._clock
        stop_at = min((p.deadline for p in pending), default=math.inf)
        return lambda: flag.is_set() or clock() >= stop_at

    async def _iterate(self, taken: list[Pending[T, R]], now: float) -> None:
        """One iteration: the joiners are prepared, steps run (until an item is done or the
        loop has something to change), the done are decoded."""
        active, held = list(self.active), list(self.held)
        start = self._clock()
        if taken:  # the joiners run in this call: the gauge counts them while it runs
            self._hooks.active_items(len(active) + len(taken))
        full = len(active) + len(taken) >= self.limit(self.key)
        until = self._until([*taken, *(a.pending for a in active)], full)
        hold = self._hold(full)
        self._saturated = hold > 1
        try:
            ran = await self._advance([p.payload for p in taken],
                                      [(a.pending.payload, a.state) for a in active], until,
                                      [(a.pending.payload, a.state) for a in held], hold,
                                      self._upcoming() if hold > 1 else [])
        except Exception as exc:  # the call itself failed (the engine hung): nothing is known
            self._fail([*taken, *(a.pending for a in [*active, *held])], exc)
            self.queue.release(taken)
            self.held = []
            self._leave([*active, *held])
            return
        decoded = ran.finished is not None or ran.finish_error is not None
        if decoded and held:
            self.held = []
        elapsed = self._clock() - start
        if taken:
            active += self._join(taken, ran, now)
        if not active:
            if decoded and held:
                await self._finish(held, ran)
            return
        for item in active:
            if item.first_step is None:
                item.first_step = start
        for _ in range(ran.steps):  # the steps before any failed one all fitted
            self._hooks.step(len(active))
            self.sizes.fitted(self.key, len(active))
        for item in active:
            item.steps += ran.steps
            item.shared += ran.steps * len(active)
        if ran.step_error is not None:
            if isinstance(ran.step_error, EngineOutOfMemory):
                self._shrink(active, ran.step_error)
            else:
                self._fail([a.pending for a in active], ran.step_error)
                self._leave(active)
            return
        done = [a for a in active if self._runner.done(a.state)]
        if decoded:
            await self._finish([*held, *done], ran)
        elif done:  # fewer than `_hold`: they wait out of the batch for the next ones
            ids = set(map(id, done))
            self.active = [a for a in self.active if id(a) not in ids]
            self.held += done
            self._hooks.active_items(len(self.active))
        elif not taken and ran.steps:
            self.times.note(self.key, elapsed / ran.steps)

    def _upcoming(self) -> list[T]:
        """At saturation (`_hold` > 1): the queued items of the running key next in line (two
        batches' worth) not sent ahead before, once there are half a batch of them, so the
        runner can encode their prompts in one call before they join one by one."""
        limit = self.limit(self.key)
        group = self.queue.groups.get(self.key)
        if group is None:
            return []
        fresh = [p for p in group.items[:2 * limit] if p.seq not in self._ahead]
        if len(fresh) < max(2, limit // 2):
            return []
        if len(self._ahead) > 8 * limit:  # forget those long gone (joined, left, expired)
            self._ahead = {p.seq for p in group.items[:2 * limit]}
        self._ahead.update(p.seq for p in fresh)
        return [p.payload for p in fresh]

    def _hold(self, full: bool) -> int:
        """How many done items to decode together. One (at once) unless the batch is full and
        a batch's worth more of its key waits: then half the batch, as the whole-batch
        policies decode a batch at once. At saturation items finish one by one (they joined
        one by one), and decoding each alone wastes the batch gain of the decoder (on a CPU, a
        tiny model's decode of one image costs two thirds of a batch's per image); there a
        queued request's wait is seconds, and the first held item waits a few steps more.
        Never while draining, never when the batch is not full or less than a batch waits
        (latency wins there)."""
        if not full or self.queue.closed:
            return 1
        group = self.queue.groups.get(self.key)
        limit = self.limit(self.key)
        # a backlog of a whole batch: saturation, not the burst of a moderate load (where the
        # first held item's few steps more showed in the p95)
        return max(1, limit // 2) if group is not None and len(group.items) >= limit else 1

    def _shrink(self, active: list[Active[T, R]], exc: EngineOutOfMemory) -> None:
        """Out of memory: the last joiners go back to the queue (they restart from scratch
        later) and the key's limit drops (`BatchSizes`); alone, the item fails."""
        self.sizes.out_of_memory(self.key, len(active))
        if len(active) == 1:
            self._fail([active[0].pending], exc)
            self._leave(active)
            return
        keep = min(len(active) - 1, self.limit(self.key))
        back = active[keep:]
        log.warning("out of memory at a step of %d; requeueing the %d that joined last",
                    len(active), len(back))
        ids = set(map(id, back))
        self.active = [a for a in self.active if id(a) not in ids]
        self.queue.requeue([a.pending for a in back])
        self._hooks.active_items(len(self.active))

    async def _finish(self, done: list[Active[T, R]], ran: Advanced[R]) -> None:
        """Answers the items whose schedule ended with what the iteration decoded; when that
        decode failed, retries it split in halves (as `run_split` does), answering each part
        the moment it is decoded."""
        images, longest = 0, 0.0
        first: list[R] | Exception | None = ran.finished
        if first is None:
            first = ran.finish_error or RuntimeError("no results")

        async def finish(pairs: list[tuple[T, Any]]) -> list[R]:
            nonlocal first
            if first is None:  # a smaller retry after the iteration's decode failed
                return await self._runner.finish(pairs)
            ready, first = first, None  # run_split starts with all of `done`: this attempt ran
            if isinstance(ready, Exception):
                raise ready
            return ready

        def deliver(part: Part[R]) -> None:
            nonlocal images, longest
            now = self._clock()
            for n, index in enumerate(part.indices):
                item = done[index]
                future = item.pending.future
                if future.cancelled():
                    self._hooks.rejected("cancelled")
                elif future.done():
                    pass  # already failed by a drain cut-off or fail_all
                elif part.error is not None or part.results is None:
                    self._fail([item.pending], part.error or RuntimeError("no result"))
                else:
                    outcome = item.outcome(part.results[n], now)
                    longest = max(longest, outcome.inference_s)
                    images += 1
                    future.set_result(outcome)
                    self.queue.note_service_time(outcome.inference_s, self.limit(self.key))

        await run_split(finish, [(a.pending.payload, a.state) for a in done],
                        deliver, clock=self._clock)
        self._leave(done)
        self._hooks.batch_finished(len(done), longest, images)
