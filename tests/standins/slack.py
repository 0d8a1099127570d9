"""A stand-in of the Slack Web API (https://api.slack.com/methods) for the Slack app's tests,
and the Slack side of the conversation: signed slash commands and events POSTed to the app.

Serves `{url}/api/<method>` for exactly the methods the app calls: auth.test, chat.postMessage,
chat.update, files.getUploadURLExternal, files.completeUploadExternal, plus the upload URL the
second one hands out. Arguments are read from the query string, a form or a JSON body, the token
from `Authorization: Bearer` or a `token` argument, as Slack accepts them. Answers are HTTP 200
with `{"ok": true, ...}` or `{"ok": false, "error": "<code>"}` (`not_authed`, `invalid_auth`,
`channel_not_found`, `no_text`, `msg_too_long`, `message_not_found`, `invalid_arguments`).

Requests to the app are signed as Slack signs them (v0 HMAC-SHA256 of `v0:<timestamp>:<body>`
under the signing secret, slack_sdk's `SignatureVerifier`), so the app's own verification runs.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from slack_sdk.signature import SignatureVerifier
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from standins import Call, Standin, read_params

TEAM = "T0STANDIN"
BOT_USER_ID = "U0BATCHBOT"
BOT_ID = "B0BATCH"
APP_ID = "A0BATCHAPP"


@dataclass
class Channel:
    id: str
    name: str
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Every message by ts, as it is now (the users' and the app's; files as messages)."""
    updates: dict[str, int] = field(default_factory=dict)


class SlackError(Exception):
    pass


class SlackStandin(Standin):
    def __init__(self, token: str, signing_secret: str) -> None:
        super().__init__()
        self.token = token
        self.signing_secret = signing_secret
        self.channels: dict[str, Channel] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/api/{method}", self.handle, methods=["GET", "POST"]),
            Route("/upload/v1/{file_id}", self.upload, methods=["POST"]),
        ])

    # -- the Slack side: channels, users, and what Slack sends the app -----------------------

    def channel(self, channel_id: str, name: str) -> Channel:
        with self._lock:
            return self.channels.setdefault(channel_id, Channel(channel_id, name))

    def next_ts(self) -> str:
        return f"{1_700_000_000 + next(self._ts)}.000100"

    def command(self, app_url: str, text: str, *, channel: str, user: str,
                command: str = "/imagine", **signing: Any) -> httpx.Response:
        """A user runs a slash command: Slack POSTs the form to the app."""
        body = urlencode({
            "token": "deprecated-verification-token", "team_id": TEAM, "team_domain": "standin",
            "channel_id": channel, "channel_name": self.channels[channel].name,
            "user_id": user, "user_name": user.lower(), "command": command, "text": text,
            "api_app_id": APP_ID, "is_enterprise_install": "false",
            "response_url": f"{self.url}/commands/{next(self._ids)}",
            "trigger_id": f"{next(self._ids)}.trigger",
        }).encode()
        return self.post_to_app(app_url, body, "application/x-www-form-urlencoded", **signing)

    def mention(self, app_url: str, text: str, *, channel: str, user: str,
                thread_ts: str | None = None, event_id: str | None = None,
                **signing: Any) -> tuple[str, httpx.Response]:
        """A user posts `text` mentioning the app: the message lands in the channel and Slack
        POSTs the `app_mention` event to the app. Returns the message ts and the answer."""
        ts = self.next_ts()
        message = {"type": "message", "user": user, "text": f"<@{BOT_USER_ID}> {text}",
                   "ts": ts, **({"thread_ts": thread_ts} if thread_ts else {})}
        with self._lock:
            self.channels[channel].messages[ts] = message
        event = {"type": "app_mention", "user": user, "text": message["text"], "ts": ts,
                 "channel": channel, "event_ts": ts, "team": TEAM,
                 **({"thread_ts": thread_ts} if thread_ts else {})}
        body = orjson.dumps({
            "token": "deprecated-verification-token", "team_id": TEAM, "api_app_id": APP_ID,
            "event": event, "type": "event_callback",
            "event_id": event_id or f"Ev{next(self._ids):08d}", "event_time": int(time.time()),
            "authorizations": [{"team_id": TEAM, "user_id": BOT_USER_ID, "is_bot": True}],
        })
        return ts, self.post_to_app(app_url, body, "application/json", **signing)

    def post_to_app(self, app_url: str, body: bytes, content_type: str, *, sign: bool = True,
                    age_s: float = 0.0, secret: str | None = None) -> httpx.Response:
        """POSTs as Slack does: signed with the signing secret (unless `sign` is False), the
        timestamp `age_s` seconds old, or signed with another `secret`."""
        headers = {"Content-Type": content_type}
        if sign:
            timestamp = str(int(time.time() - age_s))
            verifier = SignatureVerifier(secret or self.signing_secret)
            headers["X-Slack-Request-Timestamp"] = timestamp
            headers["X-Slack-Signature"] = verifier.generate_signature(
                timestamp=timestamp, body=body)
        return httpx.post(app_url, content=body, headers=headers, timeout=30)

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        """The replies in a thread, oldest first."""
        with self._lock:
            return [m for m in self.channels[channel].messages.values()
                    if m.get("thread_ts") == thread_ts and m["ts"] != thread_ts]

    # -- the Web API -------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        method = request.path_params["method"]
        params, _ = await read_params(request)
        call = Call(method, params)
        self.record(call)
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        token = bearer or str(params.get("token") or "")
        handler = getattr(self, "m_" + method.replace(".", "_"), None)
        try:
            if not token:
                raise SlackError("not_authed")
            if token != self.token:
                raise SlackError("invalid_auth")
            if handler is None:
                raise SlackError("unknown_method")
            result = {"ok": True, **handler(params)}
        except SlackError as exc:
            result = {"ok": False, "error": str(exc)}
        self.answered(call, result)
        return JSONResponse(result)

    async def upload(self, request: Request) -> Response:
        file_id = request.path_params["file_id"]
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            _, files = await read_params(request)
            data = next(iter(files.values()), b"")
        else:
            data = await request.body()
        call = Call("(upload)", {"file_id": file_id}, {"file": data})
        self.record(call)
        with self._lock:
            upload = self.uploads.get(file_id)
            if upload is None:
                self.answered(call, 404)
                return PlainTextResponse("Not Found", status_code=404)
            upload["data"] = data
        self.answered(call, 200)
        return PlainTextResponse(f"OK - {len(data)}")

    def m_auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"url": "https://standin.slack.com/", "team": "Stand-in", "user": "batchserve",
                "team_id": TEAM, "user_id": BOT_USER_ID, "bot_id": BOT_ID,
                "is_enterprise_install": False}

    def m_chat_postMessage(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params.get("channel"))
        text = str(params.get("text") or "")
        if not text.strip() and not params.get("blocks"):
            raise SlackError("no_text")
        if len(text) > 40_000:
            raise SlackError("msg_too_long")
        message = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "text": text,
                   "ts": self.next_ts()}
        if params.get("thread_ts"):
            message["thread_ts"] = str(params["thread_ts"])
        with self._lock:
            channel.messages[message["ts"]] = message
        return {"channel": channel.id, "ts": message["ts"], "message": dict(message)}

    def m_chat_update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params.get("channel"))
        text = str(params.get("text") or "")
        with self._lock:
            message = channel.messages.get(str(params.get("ts")))
            if message is None:
                raise SlackError("message_not_found")
            if message.get("bot_id") != BOT_ID:
                raise SlackError("cant_update_message")
            if not text.strip() and not params.get("blocks"):
                raise SlackError("no_text")
            message["text"] = text
            message["edited"] = {"user": BOT_USER_ID, "ts": self.next_ts()}
            channel.updates[message["ts"]] = channel.updates.get(message["ts"], 0) + 1
            return {"channel": channel.id, "ts": message["ts"], "text": text,
                    "message": dict(message)}

    def m_files_getUploadURLExternal(self, params: dict[str, Any]) -> dict[str, Any]:
        filename, length = params.get("filename"), str(params.get("length") or "")
        if not filename or not length.isdigit():
            raise SlackError("invalid_arguments")
        file_id = f"F{next(self._ids):010d}"
        with self._lock:
            self.uploads[file_id] = {"id": file_id, "name": filename, "length": int(length),
                                     "data": None}
        return {"upload_url": f"{self.url}/upload/v1/{file_id}", "file_id": file_id}

    def m_files_completeUploadExternal(self, params: dict[str, Any]) -> dict[str, Any]:
        try:
            files = orjson.loads(params.get("files") or "null")
        except orjson.JSONDecodeError:
            raise SlackError("invalid_arguments") from None
        if not isinstance(files, list) or not files:
            raise SlackError("invalid_arguments")
        channel = self._channel(params["channel_id"]) if params.get("channel_id") else None
        shared = []
        with self._lock:
            for item in files:
                upload = self.uploads.get(str(item.get("id")))
                if upload is None or upload["data"] is None:
                    raise SlackError("invalid_arguments")
                upload["title"] = item.get("title") or upload["name"]
                shared.append({"id": upload["id"], "title": upload["title"],
                               "name": upload["name"]})
            if channel is not None:
                message = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID,
                           "text": str(params.get("initial_comment") or ""),
                           "ts": self.next_ts(), "files": shared}
                if params.get("thread_ts"):
                    message["thread_ts"] = str(params["thread_ts"])
                channel.messages[message["ts"]] = message
        return {"files": shared}

    def _channel(self, channel_id: Any) -> Channel:
        with self._lock:
            channel = self.channels.get(str(channel_id or ""))
        if channel is None:
            raise SlackError("channel_not_found")
        return channel
