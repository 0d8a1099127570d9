"""Tenants: who a request belongs to, and the limits that come with its API key.

`--api-keys FILE` is a TOML file, one table per tenant::

    [tenants.alice]
    key = "sk-alice-..."      # or key_sha256 = "<hex>"
    weight = 3                # share under contention (default 1)
    max_queued = 64           # requests + jobs waiting (default --max-queue)
    images_per_minute = 120   # default unlimited
    max_priority = 5          # default --max-priority

`--api-key` alone is one tenant named `default`. Keys are compared as SHA-256 digests with
`hmac.compare_digest` against every tenant (no early exit, no dict lookup keyed by the secret),
so the time taken says nothing about which key, or how much of one, matched.

The tenant of the request being served travels in a context variable (`CURRENT`), set by the
gateway's `authorize`: the service reads it when queueing, so no door has to thread it through.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import math
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("batchserve.tenants")

ANONYMOUS = ""
"""The tenant of every request when no key is configured: one tenant, the whole server."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELDS = {"key", "key_sha256", "weight", "max_queued", "images_per_minute", "max_priority"}

CURRENT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default=ANONYMOUS)


class TenantsError(ValueError):
    """A tenants file that cannot be used; the message says which tenant and why."""


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    key_sha256: bytes = field(repr=False)
    weight: float = 1.0
    max_queued: int | None = None
    """None: the server's --max-queue."""
    images_per_minute: float | None = None
    max_priority: int | None = None
    """None: the server's --max-priority."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _tenant(name: str, table: Any) -> Tenant:
    if not _NAME.fullmatch(name):
        raise TenantsError(f"tenant {name!r}: names are 1-64 of A-Z a-z 0-9 _ . -")
    if not isinstance(table, Mapping):
        raise TenantsError(f"tenant {name!r}: must be a table")
    unknown = set(table) - _FIELDS
    if unknown:
        raise TenantsError(f"tenant {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    key, hexed = table.get("key"), table.get("key_sha256")
    if (key is None) == (hexed is None):
        raise TenantsError(f"tenant {name!r}: give exactly one of key, key_sha256")
    if key is not None:
        if not isinstance(key, str) or len(key) < 8:
            raise TenantsError(f"tenant {name!r}: key must be a string of 8+ characters")
        digest = _digest(key)
    else:
        try:
            digest = bytes.fromhex(str(hexed))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TenantsError(f"tenant {name!r}: key_sha256 must be 64 hex digits")

    def number(field_name: str, lo: float, hi: float, integer: bool) -> Any:
        value = table.get(field_name)
        if value is None:
            return None
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            raise TenantsError(f"tenant {name!r}: {field_name} must be a number in {lo}..{hi}")
        return value

    weight = number("weight", 0.01, 1000, False)
    return Tenant(
        name, digest, float(weight) if weight is not None else 1.0,
        number("max_queued", 1, 1_000_000, True), number("images_per_minute", 0.01, 1e6, False),
        number("max_priority", -10, 10, True),
    )


def parse(text: str) -> dict[str, Tenant]:
    """The tenants of a file's text, or `TenantsError` naming what is wrong."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TenantsError(f"not valid TOML: {exc}") from None
    tables = data.get("tenants")
    if set(data) - {"tenants"} or not isinstance(tables, Mapping) or not tables:
        raise TenantsError("expected [tenants.NAME] tables and nothing else")
    tenants = {name: _tenant(name, table) for name, table in tables.items()}
    seen: dict[bytes, str] = {}
    for tenant in tenants.values():
        if tenant.key_sha256 in seen:
            raise TenantsError(f"tenants {seen[tenant.key_sha256]!r} and {tenant.name!r} "
                               "share a key")
        seen[tenant.key_sha256] = tenant.name
    return tenants


class RateLimiter:
    """Images per minute as a token bucket (a minute's worth of burst), per tenant."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def try_take(self, tenant: Tenant, images: int) -> float:
        """Takes `images` tokens and returns 0, or takes none and returns the seconds until
        they would be there."""
        rate = tenant.images_per_minute
        if rate is None:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.get(tenant.name, (rate, now))
        tokens = min(rate, tokens + (now - at) * rate / 60.0)
        if tokens >= images:
            self._buckets[tenant.name] = (tokens - images, now)
            return 0.0
        self._buckets[tenant.name] = (tokens, now)
        return (min(images, rate) - tokens) * 60.0 / rate


class Tenants:
    """The tenants in force. `reload` swaps them whole; a bad file keeps the old ones."""

    def __init__(self, tenants: Mapping[str, Tenant], path: Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._tenants = dict(tenants)
        self.path = path
        self.rates = RateLimiter(clock)

    @classmethod
    def from_settings(cls, api_keys: str | None, api_key: str | None) -> Tenants | None:
        """From `--api-keys FILE` (`TenantsError` when it is bad), else `--api-key` as the
        tenant `default`; None when neither is set (no authentication)."""
        if api_keys:
            path = Path(api_keys)
            try:
                text = path.read_text()
            except OSError as exc:
                raise TenantsError(f"cannot read {path}: {exc.strerror}") from None
            return cls(parse(text), path)
        if api_key:
            return cls({"default": Tenant("default", _digest(api_key))})
        return None

    def reload(self) -> bool:
        """Re-reads the file (SIGHUP). Queued work is untouched: it keeps its tenant name, and
        a tenant that left is simply no longer admitted."""
        if self.path is None:
            return False
        try:
            tenants = parse(self.path.read_text())
        except (OSError, TenantsError) as exc:
            log.error("tenants file %s not reloaded, keeping the previous one: %s",
                      self.path, exc)
            return False
        self._tenants = tenants
        log.info("tenants file %s reloaded: %d tenants", self.path, len(tenants))
        return True

    @property
    def names(self) -> list[str]:
        return sorted(self._tenants)

    def get(self, name: str) -> Tenant | None:
        return self._tenants.get(name)

    def weight(self, name: str) -> float:
        tenant = self._tenants.get(name)
        return tenant.weight if tenant is not None else 1.0

    def lookup(self, key: str) -> Tenant | None:
        """The tenant whose key this is. Every tenant is compared, in constant time each."""
        digest = _digest(key)
        found: Tenant | None = None
        for tenant in self._tenants.values():
            if hmac.compare_digest(digest, tenant.key_sha256):
                found = tenant
        return found


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))
