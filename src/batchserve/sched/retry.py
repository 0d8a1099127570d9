"""How one batch is run when the engine fails part of it.

Out of memory: the part is retried as two halves, down to single items, and the sizes that ran
or failed are reported (`batchsize.BatchSizes` learns from them). Any other engine error on more
than one item: the part is bisected the same way, so only a poisonous item fails and strangers
batched with it still get their image. Domain errors (`BatchServeError`: the engine hung, the
server stops) and `Interrupted` (nobody waits for any item of the part) are final for the whole
part.

Each part is delivered as soon as it ends, so the first half's clients get their images while
the second half still runs. Retries never start while anything of the failed attempt is alive:
the `except` is left first, the traceback's frames (which hold the attempt's tensors) are
cleared, and only the exception's type and message are kept for an out-of-memory error.
"""

from __future__ import annotations

import logging
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ..errors import BatchServeError, EngineOutOfMemory, Interrupted

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("batchserve.batcher")

Runner = Callable[[list[T]], Awaitable[list[R]]]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Part(Generic[R]):
    """One engine call over some of the batch's items: one result each, or one error for all."""

    indices: tuple[int, ...]
    results: Sequence[R] | None
    error: BaseException | None
    started: float
    seconds: float

    @property
    def size(self) -> int:
        return len(self.indices)


class SizeReport(Protocol):
    """Where the sizes that fitted or ran out of memory go (`BatchSizes` bound to one key)."""

    def fitted(self, size: int) -> None: ...

    def out_of_memory(self, size: int) -> None: ...


class _NoReport:
    def fitted(self, size: int) -> None:
        pass

    def out_of_memory(self, size: int) -> None:
        pass


class OutOfMemoryAtOne(EngineOutOfMemory):
    """A single item that does not fit; carries the message only, nothing of the attempt."""


async def run_split(
    runner: Runner[T, R],
    payloads: Sequence[T],
    deliver: Callable[[Part[R]], None],
    *,
    clock: Clock,
    wanted: Callable[[int], bool] = lambda index: True,
    sizes: SizeReport | None = None,
    starting: Callable[[tuple[int, ...]], None] = lambda indices: None,
) -> None:
    """Runs `payloads` as one batch, retrying failed parts smaller (see the module docstring).

    Calls `deliver` once per part that ran, in the order parts end; an index appears in at most
    one delivered part. Indices for which `wanted` turns false before their part starts are never
    run nor delivered (their clients left). `starting` is told the indices of each part just
    before the runner is called for it (the batcher arms that part's stop flag).
    """
    report = sizes or _NoReport()
    todo: deque[tuple[int, ...]] = deque([tuple(range(len(payloads)))])
    while todo:
        indices = tuple(i for i in todo.popleft() if wanted(i))
        if not indices:
            continue
        started = clock()
        oom = False
        error: BaseException | None = None
        results: list[R] | None = None
        starting(indices)
        try:
            results = await runner([payloads[i] for i in indices])
        except EngineOutOfMemory as exc:
            oom, error = True, OutOfMemoryAtOne(str(exc))
            _release(exc)
        except Exception as exc:
            error = exc
            _release(exc)
        # Outside the `except`: nothing of the failed attempt is referenced any more.
        seconds = clock() - started
        if results is not None and len(results) != len(indices):
            error = RuntimeError(f"engine returned {len(results)} results for {len(indices)}")
            results = None
        if error is None:
            report.fitted(len(indices))
        elif oom:
            report.out_of_memory(len(indices))
        final = isinstance(error, BatchServeError | Interrupted)
        if error is not None and len(indices) > 1 and not final:
            mid = len(indices) // 2
            log.warning("%s at batch size %d; retrying as %d + %d",
                        "out of memory" if oom else f"engine error ({type(error).__name__})",
                        len(indices), mid, len(indices) - mid)
            todo.extendleft([indices[mid:], indices[:mid]])
            continue
        deliver(Part(indices, results, error, started, seconds))


def _release(exc: BaseException) -> None:
    """Drops the locals of every finished frame the exception (and its chain) points at: those
    frames hold the failed attempt's inputs and activations."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
