"""`batchserve bot slack`: a Slack app (slack-bolt, async, HTTP mode) in front of a batchserve
URL.

`/imagine <prompt>` opens a thread in the channel with the prompt; an app mention makes an image
in the mention's thread. In that thread one status message is updated as the job moves, then the
image is uploaded with its seed. `/imagine cancel`, `/cancel` or a mention saying `cancel`
cancels. Every request to `POST /slack/events` (events and slash commands alike) is verified
with the signing secret by bolt (unsigned, forged or older than five minutes: 401).
`--slack-api-url` points the Web API client at another base URL (a stand-in, a proxy)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from slack_bolt.adapter.starlette.async_handler import AsyncSlackRequestHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .chat import Options
from .lifecycle import Core, Endpoint, Stop, setup_logging
from .settings import SlackSettings

log = logging.getLogger("batchserve.bots.slack")
_MENTION = re.compile(r"<@[A-Z0-9]+(?:\|[^>]*)?>")
Ack = Callable[..., Awaitable[None]]
HELP = ("Send `/imagine <prompt>` (or mention me with a prompt) and I will draw it in a "
        "thread. `/imagine cancel` cancels your image on the way.")


class SlackReply:
    """One prompt's answers in a thread: a status message (posted, then updated) and the
    image. Without a thread yet (a slash command), the first status opens one with `opening`."""

    def __init__(self, web: AsyncWebClient, channel: str, thread_ts: str | None,
                 opening: str) -> None:
        self.web = web
        self.channel = channel
        self.thread_ts = thread_ts
        self.opening = opening
        self.ts: str | None = None

    async def status(self, text: str, *, job_id: str | None = None) -> None:
        if self.ts is not None:
            await self.web.chat_update(channel=self.channel, ts=self.ts, text=text)
            return
        if self.thread_ts is None:
            opened = await self.web.chat_postMessage(channel=self.channel, text=self.opening)
            self.channel, self.thread_ts = str(opened["channel"]), str(opened["ts"])
        posted = await self.web.chat_postMessage(channel=self.channel, text=text,
                                                 thread_ts=self.thread_ts)
        self.channel, self.ts = str(posted["channel"]), str(posted["ts"])

    async def image(self, data: bytes, caption: str, job_id: str) -> None:
        await self.web.files_upload_v2(
            channel=self.channel, thread_ts=self.thread_ts, file=data,
            filename=f"{job_id}.png", title=caption, initial_comment=caption,
        )


class SlackBot:
    def __init__(self, settings: SlackSettings) -> None:
        self.settings = settings
        self.core = Core(settings)
        self.web = AsyncWebClient(
            token=settings.slack_bot_token, base_url=settings.slack_api_url,
            retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
        )
        self.app = AsyncApp(client=self.web, signing_secret=settings.slack_signing_secret,
                            logger=logging.getLogger("batchserve.bots.slack.bolt"))
        self.options: dict[str, Options] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()  # event ids: Slack re-sends
        self.app.command("/imagine")(self.imagine)
        self.app.command("/cancel")(self.cancel_command)
        self.app.event("app_mention")(self.mention)

    async def imagine(self, ack: Ack, command: dict[str, Any]) -> None:
        text = str(command.get("text") or "").strip()
        channel, user = str(command["channel_id"]), str(command["user_id"])
        if text.lower() in ("", "help"):
            await ack(HELP)
            return
        if text.lower() == "cancel":
            await ack(await self._cancel(channel, user))
            return
        opening = f"<@{user}> asked for: {_escape(text)}"
        refusal = self._start(channel, user, text, SlackReply(self.web, channel, None, opening))
        await ack(refusal or "")

    async def cancel_command(self, ack: Ack, command: dict[str, Any]) -> None:
        await ack(await self._cancel(str(command["channel_id"]), str(command["user_id"])))

    async def mention(self, body: dict[str, Any], event: dict[str, Any]) -> None:
        event_id = str(body.get("event_id") or "")
        if event_id:
            if event_id in self._seen:
                return
            self._seen[event_id] = None
            while len(self._seen) > 1000:
                self._seen.popitem(last=False)
        channel, user = str(event["channel"]), str(event.get("user") or "")
        thread = str(event.get("thread_ts") or event["ts"])
        prompt = _MENTION.sub("", str(event.get("text") or "")).strip()
        if prompt.lower() in ("", "help"):
            await self._post(channel, thread, HELP)
        elif prompt.lower() == "cancel":
            await self._post(channel, thread, await self._cancel(channel, user))
        elif refusal := self._start(channel, user, prompt,
                                    SlackReply(self.web, channel, thread, "")):
            await self._post(channel, thread, refusal)

    def _start(self, channel: str, user: str, prompt: str, reply: SlackReply) -> str | None:
        # A channel is shared by many people: "one job per chat" is per person in a channel.
        chat = f"{channel}/{user}"
        options = self.options.setdefault(chat, Options())
        return self.core.jobs.start(chat, user, prompt, options, reply)

    async def _cancel(self, channel: str, user: str) -> str:
        count = await self.core.jobs.cancel(f"{channel}/{user}")
        if not count:
            return "You have no image on the way."
        return "Cancelling your image." if count == 1 else f"Cancelling your {count} images."

    async def _post(self, channel: str, thread: str, text: str) -> None:
        try:
            await self.web.chat_postMessage(channel=channel, thread_ts=thread, text=text)
        except SlackApiError as exc:
            log.warning("could not answer in a thread: %s", exc.response.get("error"))

    def http_app(self) -> Starlette:
        handler = AsyncSlackRequestHandler(self.app)

        async def events(request: Request) -> Response:
            return await handler.handle(request)

        async def healthz(request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        return Starlette(routes=[Route("/slack/events", events, methods=["POST"]),
                                 Route("/healthz", healthz, methods=["GET"])])

    async def main(self) -> int:
        stop = Stop()
        stop.install()
        await self.core.start()
        endpoint = Endpoint(self.http_app(), self.settings.host, self.settings.port)
        serving = await endpoint.start_serving()
        log.info("slack app ready: POST /slack/events on %s:%d", self.settings.host,
                 self.settings.port)
        await stop.requested.wait()
        endpoint.should_exit = True  # Slack re-sends what it cannot deliver meanwhile
        await serving
        await self.core.drain(stop)
        await self.core.close()
        return 0


def _escape(text: str) -> str:
    """Slack's three control characters in message text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def run(settings: SlackSettings) -> int:
    """Serves until SIGTERM/SIGINT (then drains); the process exit code."""
    setup_logging(settings)
    return asyncio.run(SlackBot(settings).main())
