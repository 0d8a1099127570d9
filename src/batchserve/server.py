"""Runs the app under uvicorn (uvloop + httptools) with a draining shutdown.

The first SIGTERM/SIGINT does not stop the listener: `/readyz` turns 503 and new requests get
503 while queued and in-flight work finishes (up to `drain_timeout_s`); only then does uvicorn
shut down. A second signal ends the grace period at once (what is unfinished gets 503), a third
leaves it to uvicorn's own exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

import uvicorn

from .api import create_app
from .engines.families import check_start
from .logs import JSONFormatter, configure_logging
from .service import Service
from .settings import Settings, SettingsError

__all__ = ["JSONFormatter", "Server", "run"]  # JSONFormatter: where earlier code found it
log = logging.getLogger("batchserve")


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._signals = 0
        service.on_fatal = self._fatal

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, AttributeError):  # no SIGHUP on Windows
            self._loop.add_signal_handler(signal.SIGHUP, self.service.reload_tenants)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signals >= 2 or self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._signals += 1
        # A signal handler interrupts whatever the loop was doing: hand over, don't touch it.
        step = self._start_drain if self._signals == 1 else self._end_drain
        self._loop.call_soon_threadsafe(step, sig)

    def _start_drain(self, sig: int) -> None:
        log.info("signal %d: draining before exit", sig)
        self._drain = asyncio.create_task(self._drain_then_exit())

    def _end_drain(self, sig: int) -> None:
        log.warning("signal %d again: ending the drain now", sig)
        self.service.end_drain()

    async def _drain_then_exit(self) -> None:
        await self.service.drain()
        self.should_exit = True

    def _fatal(self, reason: str) -> None:
        log.critical("fatal: %s; exiting so the orchestrator restarts us", reason)
        self.exit_code = 1
        self.should_exit = True


def run(settings: Settings) -> int:
    """Serves until drained or a fatal error; returns the process exit code."""
    configure_logging(settings.log_level, log_prompts=settings.log_prompts)
    try:
        check_start(settings)  # the model's family, samplers and flags: before binding a port
        service = Service(settings)
    except SettingsError as exc:
        print(f"batchserve: invalid setting: {exc}", file=sys.stderr)
        return 2
    app = create_app(settings, service)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=30,
    )
    server = Server(config, service)
    server.run()
    code = server.exit_code
    if code == 0 and not server.started:
        code = 1  # could not bind, or startup failed
    service.worker.stop()  # ended already after a normal stop; a no-op then
    if not service.worker.join(1.0):
        # A hung engine call (the watchdog's case, or one that did not reach its next step
        # in time): finalizing the interpreter under running native code aborts (SIGABRT), so
        # leave without it, non-zero on purpose.
        logging.shutdown()
        os._exit(code or 1)
    return code
