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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..protocol import GenerationItem
from . import files
from .library import LoraLibrary
from .rows import Choice, RowAdapters

log = logging.getLogger("batchserve.lora")


class LoraUnavailable(RuntimeError):
    """An item names a LoRA that is gone or unusable since it was accepted."""


@dataclass(slots=True)
class Resident:
    version: str
    name: str
    nbytes: int
    weights: files.AdapterWeights


class LoraRuntime:
    def __init__(self, pipe: Any, device: torch.device | str, dtype: torch.dtype) -> None:
        components = {name: model for name in files.COMPONENTS
                      if (model := getattr(pipe, name, None)) is not None}
        self.signature = files.signature(components)
        self.adapters = RowAdapters(components)
        self.unet_config = pipe.unet.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.library: LoraLibrary | None = None
        self.resident: dict[str, Resident] = {}
        self._lock = threading.Lock()

    def attach(self, library: LoraLibrary) -> None:
        self.library = library
        library.attach(self.inspect)

    def inspect(self, path: Path) -> files.Layout:
        return files.inspect(path, self.signature, unet_config=self.unet_config)

    # -- what the engine calls per batch ---------------------------------------------------

    def choices(self, items: Sequence[GenerationItem]) -> list[Choice] | None:
        """Each item's adapters as (resident key, scale) pairs, loading what is not resident;
        None when no item has any (the batch runs without a single hook doing work)."""
        if not any(item.loras for item in items):
            return None
        return [self.choice(item) for item in items]

    def choice(self, item: GenerationItem) -> Choice:
        return tuple((self.ensure(pick.name), pick.scale) for pick in item.loras)

    def ensure(self, name: str) -> str:
        """The resident key of the current version of `name`, loaded now if need be."""
        library = self.library
        if library is None:
            raise LoraUnavailable("this server has no --lora-dir")
        entry = library.get(name)
        if entry is None or entry.error is not None or entry.layout is None:
            why = "it is gone" if entry is None else entry.error or "it is not judged yet"
            raise LoraUnavailable(f"LoRA {name!r} cannot be used: {why}")
        version = entry.file.version
        with self._lock:
            if version in self.resident:
                return version
        weights = files.load(entry.file.path, entry.layout, device=self.device, dtype=self.dtype)
        with self._lock:
            if version not in self.resident:
                self.adapters.add(version, weights)
                nbytes = sum(d.nbytes for deltas in weights.values() for d in deltas.values())
                self.resident[version] = Resident(version, name, nbytes, weights)
                log.info("lora %s loaded (%d bytes)", name, nbytes)
        return version

    @contextmanager
    def unet_rows(self, choices: Sequence[Choice] | None) -> Iterator[None]:
        """The UNet's rows as the rows of `choices` (one per UNet row, in batch order)."""
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
