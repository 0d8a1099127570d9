"""Webhooks: one signed `POST` of the final job JSON to an allowed host when a job ends.

Only http(s) URLs whose host and port are in `--webhook-allow-hosts` are accepted: an entry
`HOST` allows the default ports (80, 443) only, `HOST:PORT` that port (an allowed host must not
open every service it runs, say its Redis). URLs with control characters or spaces are refused
at submit (they could never be sent). Before sending, the URL is checked again (a record may
come from another process) and its host resolved: a private, loopback, link-local or otherwise
non-public address is refused unless `--webhook-allow-private`, and the request goes to the
address that was checked (no second lookup for a rebinding DNS server to answer differently).
The body is signed with HMAC-SHA256 under `--webhook-secret`:
`X-Batchserve-Signature: sha256=<hex of HMAC(secret, body)>`. Redirects are
never followed (a redirect could point anywhere), timeouts are short, and a delivery is tried
`tries` times with growing pauses on network errors, 429 and 5xx. `X-Batchserve-Delivery` (the
job id) is the same on every try so a receiver can drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ..errors import ValidationError

log = logging.getLogger("batchserve.webhooks")
SIGNATURE_HEADER = "X-Batchserve-Signature"
DELIVERY_HEADER = "X-Batchserve-Delivery"
EVENT_HEADER = "X-Batchserve-Event"
EVENTS = ("started", "progress", "completed")
"""What a job's `webhook_events` may name (Replicate's filter): `completed` (the default, the
job's end whatever it is), `started` (a worker began it), `progress` (at most one per
`PROGRESS_EVERY_S` while it runs, with its step)."""
PROGRESS_EVERY_S = 5.0
MAX_URL = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")  # control characters and spaces


def allow_entry(host: str, port: int) -> str:
    """The `--webhook-allow-hosts` entry naming exactly this host and port."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def allowed(host: str, port: int, allow_hosts: frozenset[str]) -> bool:
    """`HOST` entries allow ports 80 and 443 only; `HOST:PORT` entries that port."""
    bare = f"[{host}]" if ":" in host else host
    return allow_entry(host, port) in allow_hosts or (
        port in DEFAULT_PORTS.values() and bare in allow_hosts)


def check_url(value: Any, allow_hosts: frozenset[str]) -> str:
    """The webhook URL if acceptable, else `ValidationError` (422) naming the `webhook` field."""
    if not allow_hosts:
        raise ValidationError(
            "webhook: webhooks are disabled on this server (--webhook-allow-hosts is empty)",
            field="webhook",
        )
    if not isinstance(value, str) or not value or len(value) > MAX_URL:
        raise ValidationError(f"webhook must be an http(s) URL of at most {MAX_URL} characters",
                              field="webhook")
    if _UNSENDABLE.search(value):
        raise ValidationError("webhook must not contain spaces or control characters (encode "
                              "them as %XX)", field="webhook")
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").lower()
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        raise ValidationError("webhook is not a valid URL", field="webhook") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValidationError("webhook must be an http or https URL", field="webhook")
    if parts.username or parts.password:
        raise ValidationError("webhook must not carry credentials", field="webhook")
    if not allowed(host, port, allow_hosts):
        raise ValidationError(
            f"webhook host {host!r} on port {port} is not allowed (see --webhook-allow-hosts: "
            "HOST allows ports 80 and 443, HOST:PORT that port)", field="webhook"
        )
    return value


def public_address(address: str) -> bool:
    """False for private, loopback, link-local, multicast, reserved and unspecified
    addresses (IPv4-mapped IPv6 ones judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL  # with the checked address in place of the host name
    host_header: str
    server_name: str  # TLS SNI and certificate check: the URL's host name


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        secret: str,
        allow_hosts: frozenset[str],
        *,
        allow_private: bool = False,
        tries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        resolver: Resolver = resolve,
    ) -> None:
        self.secret = secret
        self.allow_hosts = allow_hosts
        self.allow_private = allow_private
        self._resolve = resolver
        self.tries = tries
        self.backoff_s = backoff_s
        self.timeout = httpx.Timeout(timeout_s, connect=min(2.0, timeout_s))
        self._sleep = sleep
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, job_id: str, payload: dict[str, Any],
             event: str = "completed") -> None:
        """Delivers in the background; never raises into the caller. `event` travels in the
        `X-Batchserve-Event` header (the body is the job's view either way)."""
        task = asyncio.create_task(self.deliver(url, job_id, orjson.dumps(payload), event),
                                   name=f"webhook-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, url: str, job_id: str, body: bytes,
                      event: str = "completed") -> bool:
        """True once the receiver answered 2xx."""
        try:
            check_url(url, self.allow_hosts)
            target = await self._target(url)
        except ValidationError as exc:
            log.warning("webhook for %s not sent: %s", job_id, exc.message)
            return False
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body),
                   DELIVERY_HEADER: job_id, EVENT_HEADER: event,
                   "User-Agent": "batchserve-webhook"}
        for attempt in range(1, self.tries + 1):
            outcome = await self._post(target, body, headers)
            if outcome == "ok":
                return True
            retry = not outcome.startswith("refused") and attempt < self.tries
            log.warning("webhook for %s: try %d/%d %s%s", job_id, attempt, self.tries, outcome,
                        "; retrying" if retry else "; giving up")
            if not retry:
                return False
            await self._sleep(self.backoff_s * 4 ** (attempt - 1))
        return False

    async def _target(self, url: str) -> _Target:
        """The request to send: to the first resolved address (checked unless private ones
        are allowed), with the URL's host as `Host` and TLS server name."""
        parts = httpx.URL(url)
        host, port = parts.host, parts.port or DEFAULT_PORTS[parts.scheme]
        try:
            addresses = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise ValidationError(f"host {host!r} does not resolve ({exc})") from None
        if not addresses:
            raise ValidationError(f"host {host!r} does not resolve")
        if not self.allow_private:
            hidden = [a for a in addresses if not public_address(a)]
            if hidden:  # one private answer is enough: which one is used is the resolver's
                raise ValidationError(
                    f"host {host!r} resolves to a non-public address ({hidden[0]}); see "
                    "--webhook-allow-private")
        return _Target(parts.copy_with(host=addresses[0]), parts.netloc.decode("ascii"), host)

    async def _post(self, target: _Target, body: bytes, headers: dict[str, str]) -> str:
        """"ok", "refused (...)" (a final answer: 3xx or 4xx other than 429) or what to retry."""
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout)
        request = self._client.build_request(
            "POST", target.url, content=body, headers={**headers, "Host": target.host_header},
            extensions={"sni_hostname": target.server_name})
        try:
            response = await self._client.send(request)
        except httpx.InvalidURL as exc:  # not an HTTPError: never let it escape the task
            return f"refused (invalid URL: {exc})"
        except httpx.HTTPError as exc:
            return f"failed ({type(exc).__name__})"
        if response.is_success:
            return "ok"
        if response.status_code == 429 or response.status_code >= 500:
            return f"answered {response.status_code}"
        return f"refused (answered {response.status_code})"

    async def close(self, timeout_s: float) -> None:
        """Waits up to `timeout_s` for deliveries in flight, then cancels the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
