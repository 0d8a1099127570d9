"""Webhooks: one signed `POST` of the final job JSON to an allowed host when a job ends.

Only http(s) URLs whose host is in `--webhook-allow-hosts` are accepted (and checked again before
sending: a record may come from another process). The body is signed with HMAC-SHA256 under
`--webhook-secret`: `X-Batchserve-Signature: sha256=<hex of HMAC(secret, body)>`. Redirects are
never followed (a redirect could point anywhere), timeouts are short, and a delivery is tried
`tries` times with growing pauses on network errors, 429 and 5xx. `X-Batchserve-Delivery` (the
job id) is the same on every try so a receiver can drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from ..errors import ValidationError

log = logging.getLogger("batchserve.webhooks")
SIGNATURE_HEADER = "X-Batchserve-Signature"
DELIVERY_HEADER = "X-Batchserve-Delivery"
MAX_URL = 2048


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
    try:
        parts = urlsplit(value)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValidationError("webhook is not a valid URL", field="webhook") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ValidationError("webhook must be an http or https URL", field="webhook")
    if parts.username or parts.password:
        raise ValidationError("webhook must not carry credentials", field="webhook")
    if host not in allow_hosts:
        raise ValidationError(
            f"webhook host {host!r} is not allowed (see --webhook-allow-hosts)", field="webhook"
        )
    return value


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        secret: str,
        allow_hosts: frozenset[str],
        *,
        tries: int = 3,
        backoff_s: float = 1.0,
        timeout_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.secret = secret
        self.allow_hosts = allow_hosts
        self.tries = tries
        self.backoff_s = backoff_s
        self.timeout = httpx.Timeout(timeout_s, connect=min(2.0, timeout_s))
        self._sleep = sleep
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[bool]] = set()

    def send(self, url: str, job_id: str, payload: dict[str, Any]) -> None:
        """Delivers in the background; never raises into the caller."""
        task = asyncio.create_task(self.deliver(url, job_id, orjson.dumps(payload)),
                                   name=f"webhook-{job_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def deliver(self, url: str, job_id: str, body: bytes) -> bool:
        """True once the receiver answered 2xx."""
        try:
            check_url(url, self.allow_hosts)
        except ValidationError as exc:
            log.warning("webhook for %s not sent: %s", job_id, exc.message)
            return False
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body),
                   DELIVERY_HEADER: job_id, "User-Agent": "batchserve-webhook"}
        for attempt in range(1, self.tries + 1):
            outcome = await self._post(url, body, headers)
            if outcome == "ok":
                return True
            retry = not outcome.startswith("refused") and attempt < self.tries
            log.warning("webhook for %s: try %d/%d %s%s", job_id, attempt, self.tries, outcome,
                        "; retrying" if retry else "; giving up")
            if not retry:
                return False
            await self._sleep(self.backoff_s * 4 ** (attempt - 1))
        return False

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> str:
        """"ok", "refused (...)" (a final answer: 3xx or 4xx other than 429) or what to retry."""
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, timeout=self.timeout)
        try:
            response = await self._client.post(url, content=body, headers=headers)
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
