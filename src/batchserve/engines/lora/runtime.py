"""The engine's side of per-request LoRA: names to resident adapters, and the rows of a batch.

`LoraRuntime` owns the per-row layers (`rows.RowAdapters`) of one pipeline, judges files for the
library against the model (`files.inspect`), loads an adapter's weights the first time an item
names it, and turns a batch's items into the row choices each forward pass needs: for the text
encoders the rows of each item's prompt (and negative prompt), for the UNet the rows of each item
(twice with classifier-free guidance).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..protocol import GenerationItem
from . import files
from .library import Entry, LoraLibrary, LoraUnavailable
from .rows import Choice, RowAdapters

log = logging.getLogger("batchserve.lora")


class LoraEvents(Protocol):
    """What the runtime reports (the metrics implement it); called from any thread."""

    def lora_loaded(self, name: str, seconds: float) -> None: ...
    def lora_hit(self) -> None: ...
    def lora_evicted(self) -> None: ...
    def lora_resident(self, count: int, nbytes: int) -> None: ...


class _NoEvents:
    def lora_loaded(self, name: str, seconds: float) -> None:
        pass

    def lora_hit(self) -> None:
        pass

    def lora_evicted(self) -> None:
        pass

    def lora_resident(self, count: int, nbytes: int) -> None:
        pass


@dataclass(slots=True)
class Resident:
    version: str
    name: str
    nbytes: int
    weights: files.AdapterWeights


class LoraRuntime:
    """Adapters by file version, in an LRU bounded by `cache_bytes`.

    Threads: `prefetch` runs off the engine thread (a request's adapters are read from disk and
    put on the device while it waits, other batches running meanwhile); everything that touches
    the model's hooks (`ensure`, `unet_rows`, `text_rows`, eviction) runs on the engine thread
    only, so a hook is never added or removed while a forward pass reads them. An adapter used
    by the last UNet pass or resolved since (a running item's, a joiner's) is never evicted: a
    running item keeps its adapters to its last step."""

    def __init__(self, pipe: Any, device: torch.device | str, dtype: torch.dtype, *,
                 cache_bytes: int = 1 << 30, events: LoraEvents | None = None) -> None:
        components = {name: model for name in files.COMPONENTS
                      if (model := getattr(pipe, name, None)) is not None}
        self.signature = files.signature(components)
        self.adapters = RowAdapters(components)
        self.unet_config = pipe.unet.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_bytes = cache_bytes
        self.events: LoraEvents = events or _NoEvents()
        self.library: LoraLibrary | None = None
        self.resident: OrderedDict[str, Resident] = OrderedDict()  # least recently used first
        self._staged: OrderedDict[str, Resident] = OrderedDict()  # loaded, not hooked in yet
        self._in_use: set[str] = set()  # the last UNet pass's adapters and those resolved since
        self._lock = threading.Lock()

    def attach(self, library: LoraLibrary) -> None:
        self.library = library
        library.attach(self.inspect)

    def inspect(self, path: Path) -> files.Layout:
        return files.inspect(path, self.signature, unet_config=self.unet_config)

    def resident_names(self) -> list[str]:
        with self._lock:
            return [r.name for r in self.resident.values()]

    # -- off the engine thread -------------------------------------------------------------

    def prefetch(self, name: str) -> None:
        """Reads `name`'s current version onto the device unless it is resident or staged
        already; the engine thread hooks it in when an item first uses it."""
        entry = self._entry(name)
        version = entry.file.version
        with self._lock:
            if version in self.resident or version in self._staged:
                return
        staged = self._read(name, entry)
        with self._lock:
            if version in self.resident or version in self._staged:
                return
            self._staged[version] = staged
            # staged adapters nobody took (their requests left) must not pile up
            while len(self._staged) > 1 and self._bytes(self._staged) > self.cache_bytes:
                self._staged.popitem(last=False)

    # -- what the engine thread calls per batch --------------------------------------------

    def choices(self, items: Sequence[GenerationItem]) -> list[Choice] | None:
        """Each item's adapters as (resident key, scale) pairs, loading what is not resident;
        None when no item has any (the batch runs without a single hook doing work)."""
        if not any(item.loras for item in items):
            return None
        with self._lock:  # a whole batch: nothing else runs, the last batch's adapters may go
            self._in_use = set()
        return [self.choice(item) for item in items]

    def choice(self, item: GenerationItem) -> Choice:
        return tuple((self.ensure(pick.name), pick.scale) for pick in item.loras)

    def ensure(self, name: str) -> str:
        """The resident key of the current version of `name`: hooked in now from what
        `prefetch` staged, or read now if it did not (a miss the metrics count as a load)."""
        try:
            entry: Entry | None = self._entry(name)
        except LoraUnavailable:
            # Gone (or changed badly) since the request was accepted: the copy read for it
            # at admission still serves it, rather than failing its whole batch.
            entry = None
        version = entry.file.version if entry is not None else self._held_version(name)
        with self._lock:
            hit = self.resident.get(version)
            if hit is not None:
                self.resident.move_to_end(version)
                self._in_use.add(version)
            staged = self._staged.pop(version, None)
        if hit is not None:
            self.events.lora_hit()
            self._evict()  # the budget may have shrunk, or others' use ended
            return version
        if staged is None:
            staged = self._read(name, entry or self._entry(name))
        self.adapters.add(version, staged.weights)
        with self._lock:
            self.resident[version] = staged
            self._in_use.add(version)
        self._evict()
        return version

    @contextmanager
    def unet_rows(self, choices: Sequence[Choice] | None) -> Iterator[None]:
        """The UNet's rows as the rows of `choices` (one per UNet row, in batch order)."""
        with self._lock:
            self._in_use = {key for choice in choices or () for key, _ in choice}
        if choices is None:
            yield
            return
        with self.adapters.rows("unet", choices):
            yield

    @contextmanager
    def text_rows(self, choices: Sequence[Choice] | None) -> Iterator[None]:
        """The text encoders' rows (one per encoded 77-token sequence)."""
        if choices is None:
            yield
            return
        with self.adapters.rows("text_encoder", choices), \
                self.adapters.rows("text_encoder_2", choices):
            yield

    # -- inside ----------------------------------------------------------------------------

    def _held_version(self, name: str) -> str:
        """The newest resident or staged version of `name`, else LoraUnavailable."""
        with self._lock:
            held = [v for v, r in (*self.resident.items(), *self._staged.items())
                    if r.name == name]
        if not held:
            return self._entry(name).file.version  # raises, saying why, unless back meanwhile
        return held[-1]

    def _entry(self, name: str) -> Entry:
        library = self.library
        if library is None:
            raise LoraUnavailable("this server has no --lora-dir")
        entry = library.get(name)
        if entry is None or entry.error is not None or entry.layout is None:
            why = "it is gone" if entry is None else entry.error or "it is not judged yet"
            raise LoraUnavailable(f"LoRA {name!r} cannot be used: {why}")
        return entry

    def _read(self, name: str, entry: Entry) -> Resident:
        started = time.perf_counter()
        weights = files.load(entry.file.path, entry.layout, device=self.device, dtype=self.dtype)
        nbytes = sum(d.nbytes for deltas in weights.values() for d in deltas.values())
        seconds = time.perf_counter() - started
        self.events.lora_loaded(name, seconds)
        log.info("lora %s read (%d bytes, %.2f s)", name, nbytes, seconds)
        return Resident(entry.file.version, name, nbytes, weights)

    def _evict(self) -> None:
        """Least recently used first, never one in use, until within `cache_bytes`."""
        while True:
            with self._lock:
                if self._bytes(self.resident) <= self.cache_bytes:
                    break
                victim = next((v for v in self.resident if v not in self._in_use), None)
                if victim is None:  # everything resident is in use: over budget until done
                    break
                gone = self.resident.pop(victim)
            self.adapters.remove(victim)
            self.events.lora_evicted()
            log.info("lora %s evicted (%d bytes)", gone.name, gone.nbytes)
        with self._lock:
            count, nbytes = len(self.resident), self._bytes(self.resident)
        self.events.lora_resident(count, nbytes)

    @staticmethod
    def _bytes(entries: OrderedDict[str, Resident]) -> int:
        return sum(r.nbytes for r in entries.values())
