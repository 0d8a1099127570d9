"""`--lora-dir`: the folder of LoRA files requests name, rescanned as it changes. No torch here.

A file's name is its stem (`pixel-art.safetensors` is `pixel-art`). The folder is listed again
when the listing is older than `rescan_s`, when a request names a file not seen yet (so a file
copied in is usable at once), and on `refresh()` (`POST /sdapi/v1/refresh-loras`). Each file is
judged once per version (size and modification time) by the engine's `inspect`, which reads its
header only; a file that does not fit stays listed, unusable, with the reason.

Only regular files directly in the folder count, and a link whose target lies outside the folder
is refused: a request names a file, never a path, so nothing outside `--lora-dir` is ever read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("batchserve.lora")

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
Inspect = Callable[[Path], Any]
"""The engine's header check: returns what it needs to load the file later (its layout), or
raises an exception whose message says why the file does not fit."""


class LoraUnavailable(RuntimeError):
    """A request names a LoRA that is gone or unusable (since it was accepted)."""


@dataclass(frozen=True, slots=True)
class LoraFile:
    name: str
    path: Path
    size: int
    mtime_ns: int

    @property
    def version(self) -> str:
        """Changes when the file does: what the adapter cache keys on."""
        return f"{self.name}@{self.mtime_ns}:{self.size}"


@dataclass(frozen=True, slots=True)
class Entry:
    file: LoraFile
    error: str | None = None  # why it cannot be used; None when usable (or not judged yet)
    layout: Any = field(default=None, repr=False, compare=False)
    checked: bool = False
    components: tuple[str, ...] = ()
    rank: int = 0
    parameters: int = 0

    @property
    def usable(self) -> bool:
        return self.error is None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.file.name, "file": self.file.path.name,
                               "size_bytes": self.file.size, "usable": self.usable}
        if self.error is not None:
            out["reason"] = self.error
        elif self.checked:
            out.update(components=list(self.components), rank=self.rank,
                       parameters=self.parameters)
        return out


def name_problem(name: str) -> str | None:
    """Why `name` cannot name a file of the folder (a path, a hidden file), or None."""
    if not name or name.strip() != name:
        return "must be a file name without surrounding spaces"
    if any(c in name for c in "/\\\x00") or name in (".", "..") or name.startswith("."):
        return "must be a LoRA name from the listing, not a path"
    return None


class LoraLibrary:
    """The folder's files by name, each with its verdict. Thread-safe: doors read it on the
    event loop, the engine thread resolves names through it."""

    def __init__(self, root: Path, *, rescan_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.rescan_s = rescan_s
        self._clock = clock
        self._inspect: Inspect | None = None
        self._entries: dict[str, Entry] = {}
        self._scanned: float | None = None
        self._lock = threading.Lock()

    def attach(self, inspect: Inspect | None) -> None:
        """The engine's header check; every file is judged again by it."""
        with self._lock:
            self._inspect = inspect
            self._entries = {}
        self.refresh()

    def refresh(self) -> dict[str, Entry]:
        """Lists the folder now; new or changed files are judged, vanished ones dropped."""
        try:
            found = self._list()
        except OSError as exc:
            log.warning("--lora-dir %s cannot be listed: %s", self.root, exc)
            found = {}
        with self._lock:
            old = self._entries
            self._entries = {name: self._judge(file, old.get(name))
                             for name, file in sorted(found.items())}
            self._scanned = self._clock()
            return dict(self._entries)

    def entries(self) -> dict[str, Entry]:
        """Every file by name, the listing refreshed when older than `rescan_s`."""
        if self._stale():
            return self.refresh()
        with self._lock:
            return dict(self._entries)

    def get(self, name: str) -> Entry | None:
        """The file named `name`, rescanning first when it is not known (a file just added)
        or the listing is stale; None when the folder has no such file."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or self._stale():
            entry = self.refresh().get(name)
        return entry

    def problem(self, name: str) -> str | None:
        """What is wrong with a request naming `name`, or None when it can be used."""
        bad = name_problem(name)
        if bad is not None:
            return bad
        entry = self.get(name)
        if entry is None:
            return f"no LoRA named {name!r}; GET /v1/loras (A1111: /sdapi/v1/loras) lists them"
        if entry.error is not None:
            return f"LoRA {name!r} cannot be used: {entry.error}"
        return None

    def _stale(self) -> bool:
        return self._scanned is None or self._clock() - self._scanned >= self.rescan_s

    def _list(self) -> dict[str, LoraFile]:
        root = self.root.resolve()
        files: dict[str, LoraFile] = {}
        with os.scandir(root) as scan:
            for item in scan:
                suffix = Path(item.name).suffix.lower()
                if item.name.startswith(".") or suffix not in SUFFIXES:
                    continue
                path = Path(item.path)
                if item.is_symlink() and not path.resolve().is_relative_to(root):
                    files[path.stem] = LoraFile(path.stem, path, -1, -1)  # judged unusable
                    continue
                if not item.is_file():
                    continue
                stat = item.stat()
                name = path.stem
                # two suffixes, one stem: keep the safe one
                if name in files and files[name].path.suffix.lower() == ".safetensors":
                    continue
                files[name] = LoraFile(name, path, stat.st_size, stat.st_mtime_ns)
        return files

    def _judge(self, file: LoraFile, old: Entry | None) -> Entry:
        if old is not None and old.file == file:
            return old
        if file.size < 0:
            return Entry(file, "a link to a file outside --lora-dir", checked=True)
        if file.path.suffix.lower() != ".safetensors":
            return Entry(file, "a pickle file (it could run code when loaded); convert it to "
                               ".safetensors", checked=True)
        if self._inspect is None:
            return Entry(file)
        try:
            layout = self._inspect(file.path)
        except Exception as exc:
            log.info("lora %s is unusable: %s", file.name, exc)
            return Entry(file, str(exc) or type(exc).__name__, checked=True)
        return Entry(file, None, layout, True, tuple(getattr(layout, "components", ())),
                     int(getattr(layout, "rank", 0)), int(getattr(layout, "parameters", 0)))
