"""Per-request LoRA: the folder of files requests name (`library`, no torch), reading a file into
per-layer weights for the served model (`files`), the per-row math (`rows`) and the engine's
bookkeeping of resident adapters (`runtime`). Importing this package imports no torch."""

from __future__ import annotations

from .library import Entry, LoraFile, LoraLibrary, LoraUnavailable, name_problem

__all__ = ["Entry", "LoraFile", "LoraLibrary", "LoraUnavailable", "name_problem"]
