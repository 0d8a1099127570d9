"""The largest batch that fits in device memory, learned per batching key from out-of-memory
errors, so one shape that does not fit at `--max-batch-size` splits once, not on every batch.

No torch here: the engine reports `EngineOutOfMemory`, the batcher reports sizes to this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass


@dataclass(slots=True)
class _Shape:
    limit: int  # the batcher takes at most this many items of this key
    fit: int = 0  # the largest size that ran since its last out-of-memory error
    streak: int = 0  # batches at the limit that fitted since the limit last moved
    patience: int = 0  # batches at the limit before trying one more


class BatchSizes:
    """Per key: after an out-of-memory error at size n the limit drops to the largest size known
    to fit below n, or to the larger half of n when none is known yet (the split about to run
    tries it). After `grow_after` batches at the limit fit, it grows by one; every further
    out-of-memory error of that key doubles the wait (up to `max_patience` batches), so a shape
    that never fits one more costs one failed attempt in ever longer intervals.
    """

    def __init__(
        self,
        max_size: int,
        *,
        grow_after: int = 16,
        max_patience: int = 1024,
        on_change: Callable[[Hashable, int], None] | None = None,
    ) -> None:
        self.max_size = max_size
        self.grow_after = grow_after
        self.max_patience = max_patience
        self._on_change = on_change or (lambda key, limit: None)
        self._shapes: dict[Hashable, _Shape] = {}

    def limit(self, key: Hashable) -> int:
        shape = self._shapes.get(key)
        return self.max_size if shape is None else shape.limit

    def learned(self) -> dict[Hashable, int]:
        """Every key that ever ran out of memory, with its current limit."""
        return {key: shape.limit for key, shape in self._shapes.items()}

    def out_of_memory(self, key: Hashable, size: int) -> None:
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = _Shape(self.max_size, patience=max(1, self.grow_after))
        else:
            shape.patience = min(self.max_patience, shape.patience * 2)
        shape.fit = min(shape.fit, size - 1)
        shape.streak = 0
        self._set(key, shape, min(shape.limit, size - 1, max(shape.fit, math.ceil(size / 2))))

    def fitted(self, key: Hashable, size: int) -> None:
        shape = self._shapes.get(key)
        if shape is None:
            return
        shape.fit = max(shape.fit, size)
        if size < shape.limit or shape.limit >= self.max_size:
            return
        shape.streak += 1
        if shape.streak >= shape.patience:
            shape.streak = 0
            self._set(key, shape, shape.limit + 1)

    def _set(self, key: Hashable, shape: _Shape, limit: int) -> None:
        limit = max(1, min(self.max_size, limit))
        if limit != shape.limit:
            shape.limit = limit
            self._on_change(key, limit)
