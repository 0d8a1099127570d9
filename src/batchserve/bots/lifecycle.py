"""What both bot processes share around their chat library: logging with secrets kept out, the
signals (SIGTERM/SIGINT once: stop taking prompts and drain; twice: end the drain now), the
`/v1/info` refresher, and uvicorn serving a bot's HTTP endpoint inside the bot's own loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from ..logs import configure_logging
from .chat import ChatJobs, ServerInfo
from .client import JobsClient
from .settings import BotSettings

log = logging.getLogger("batchserve.bots")


@dataclass
class Stop:
    """Set by the signals: `requested` by the first, `hurry` (end the drain) by the second."""

    requested: asyncio.Event = field(default_factory=asyncio.Event)
    hurry: asyncio.Event = field(default_factory=asyncio.Event)

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signal, sig)

    def _signal(self, sig: int) -> None:
        if self.requested.is_set():
            log.warning("signal %d again: ending the drain now", sig)
            self.hurry.set()
        else:
            log.info("signal %d: no new prompts; letting the images on the way finish", sig)
            self.requested.set()


class Core:
    """A bot's client, server info and chat jobs, built from its settings."""

    def __init__(self, settings: BotSettings) -> None:
        self.settings = settings
        self.client = JobsClient(settings.server, settings.server_api_key,
                                 retry_budget_s=settings.retry_budget_s,
                                 poll_interval_s=settings.poll_interval_s)
        self.info = ServerInfo(self.client, settings.info_refresh_s)
        self.jobs = ChatJobs(self.client, settings, self.info)
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if await self.info.refresh():
            log.info("server %s answers; sizes offered: %s", self.settings.server,
                     ", ".join(self.info.sizes.presets))
        self._refresher = asyncio.create_task(self.info.keep_fresh())

    async def drain(self, stop: Stop) -> None:
        finished, cancelled = await self.jobs.drain(self.settings.drain_timeout_s, stop.hurry)
        log.info("drained: %d finished, %d cancelled on the server (their chats were told)",
                 finished, cancelled)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.client.aclose()


def setup_logging(settings: BotSettings) -> None:
    configure_logging(settings.log_level, secrets=settings.secrets)
    # httpx logs every request URL at INFO (the Bot API's carry the token; redacted anyway):
    # noise for a bot, which makes several calls per prompt.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


class Endpoint(uvicorn.Server):
    """uvicorn serving a bot's HTTP endpoint in the bot's loop. The bot owns the signals (it
    drains before it stops), so uvicorn captures none; `should_exit` stops it."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        super().__init__(uvicorn.Config(app, host=host, port=port, lifespan="off",
                                        access_log=False, log_config=None,
                                        timeout_graceful_shutdown=5))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def start_serving(self) -> asyncio.Task[None]:
        """Serves in a task; returns once listening (raises if it could not bind)."""
        task = asyncio.create_task(self.serve())
        while not self.started:
            if task.done():
                task.result()
                raise OSError(f"could not listen on {self.config.host}:{self.config.port}")
            await asyncio.sleep(0.01)  # uvicorn offers no event for "listening"
        return task
