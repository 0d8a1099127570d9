"""A stand-in of the Telegram Bot API (https://core.telegram.org/bots/api) for the bot's tests.

Serves `POST {url}/bot<token>/<method>` for exactly the methods the bot calls: getMe,
deleteWebhook, setWebhook, setMyCommands, getUpdates (long polling), sendMessage,
editMessageText, sendPhoto, sendDocument, answerCallbackQuery. Answers are
`{"ok": true, "result": ...}` with the documented objects; errors are
`{"ok": false, "error_code", "description"}` with Telegram's wording (a wrong token: 401; an
unknown method: 404; "Bad Request: message is not modified: ..." for an edit that changes
nothing, and so on). A test plays the users: `say` and `press` add updates, which getUpdates
long-polls deliver (or, with a webhook set, are POSTed to it with the secret token header).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from standins import Call, Standin, read_params

BOT_USER = {"id": 7000000001, "is_bot": True, "first_name": "batchserve",
            "username": "batchserve_bot", "can_join_groups": True,
            "can_read_all_group_messages": False, "supports_inline_queries": False}
NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message")
JSON_FIELDS = ("reply_markup", "reply_parameters", "allowed_updates", "commands", "entities")


class ApiError(Exception):
    def __init__(self, code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclass
class Chat:
    id: int
    first_name: str
    messages: dict[int, dict[str, Any]] = field(default_factory=dict)
    """Every message in the chat by id, as it is now (the users' and the bot's)."""
    edits: dict[int, int] = field(default_factory=dict)
    photos: dict[int, bytes] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def as_object(self) -> dict[str, Any]:
        return {"id": self.id, "type": "private", "first_name": self.first_name}


class TelegramStandin(Standin):
    def __init__(self, token: str) -> None:
        super().__init__()
        self.token = token
        self.chats: dict[int, Chat] = {}
        self.webhook: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._queries: dict[str, int] = {}  # open callback query id -> chat id
        self._query_ids = itertools.count(1)
        self._new_update: asyncio.Event | None = None
        self._closed = False

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/bot{token}/{method}", self.handle,
                                       methods=["GET", "POST"])])

    # -- the test plays the users ------------------------------------------------------------

    def say(self, chat_id: int, text: str, *, user_id: int | None = None,
            name: str = "Ada") -> dict[str, Any]:
        """A user sends `text` in a private chat; returns the message."""
        with self._lock:
            chat = self.chats.setdefault(chat_id, Chat(chat_id, name))
            message: dict[str, Any] = {
                "message_id": next(chat.ids),
                "from": {"id": user_id or chat_id, "is_bot": False, "first_name": name},
                "chat": chat.as_object(), "date": int(time.time()), "text": text,
            }
            if text.startswith("/"):
                command = text.split()[0]
                message["entities"] = [{"type": "bot_command", "offset": 0,
                                        "length": len(command)}]
            chat.messages[message["message_id"]] = message
        self._push({"message": message})
        return message

    def press(self, chat_id: int, message_id: int, data: str, *,
              user_id: int | None = None) -> str:
        """A user presses the inline button with `data` under the bot's message; returns the
        callback query id."""
        with self._lock:
            chat = self.chats[chat_id]
            message = chat.messages[message_id]
            buttons = [b for row in message.get("reply_markup", {}).get("inline_keyboard", [])
                       for b in row]
            assert any(b.get("callback_data") == data for b in buttons), (data, buttons)
            query_id = str(next(self._query_ids))
            self._queries[query_id] = chat_id
        self._push({"callback_query": {
            "id": query_id,
            "from": {"id": user_id or chat_id, "is_bot": False, "first_name": chat.first_name},
            "message": message, "chat_instance": str(chat_id), "data": data,
        }})
        return query_id

    def bot_messages(self, chat_id: int) -> list[dict[str, Any]]:
        with self._lock:
            chat = self.chats.get(chat_id)
            if chat is None:
                return []
            return [m for m in chat.messages.values() if m["from"]["id"] == BOT_USER["id"]]

    def texts(self, chat_id: int) -> list[str]:
        return [m.get("text") or m.get("caption") or "" for m in self.bot_messages(chat_id)]

    def _push(self, update: dict[str, Any]) -> None:
        with self._lock:
            update = {"update_id": next(self._update_ids), **update}
            self._updates.append(update)
            webhook = self.webhook
        assert self.loop is not None
        if webhook is not None:
            asyncio.run_coroutine_threadsafe(self._deliver(webhook, update), self.loop)
        else:
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._new_update is not None:
            self._new_update.set()

    def closing(self) -> None:
        self._closed = True
        self._wake()

    async def _deliver(self, webhook: dict[str, Any], update: dict[str, Any]) -> None:
        headers = {}
        if webhook.get("secret_token"):
            headers["X-Telegram-Bot-Api-Secret-Token"] = webhook["secret_token"]
        async with httpx.AsyncClient() as client:
            response = await client.post(webhook["url"], json=update, headers=headers)
        self.record(Call("(webhook delivery)", {"update_id": update["update_id"]},
                         answer=response.status_code))

    # -- the Bot API -------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        method = request.path_params["method"]
        if request.path_params["token"] != self.token:
            return _error(ApiError(401, "Unauthorized"))
        params, files = await read_params(request, JSON_FIELDS)
        call = Call(method, params, files)
        self.record(call)
        handler = getattr(self, "m_" + method, None)
        try:
            if handler is None:
                raise ApiError(404, "Not Found")
            result = await handler(params, files)
        except ApiError as exc:
            self.answered(call, {"ok": False, "error_code": exc.code,
                                 "description": exc.description})
            return _error(exc)
        self.answered(call, result)
        return JSONResponse({"ok": True, "result": result})

    async def m_getMe(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        return BOT_USER

    async def m_deleteWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        with self._lock:
            self.webhook = None
        return True

    async def m_setWebhook(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        if not str(params.get("url", "")).startswith(("https://", "http://127.0.0.1")):
            # Telegram itself wants HTTPS; loopback http is this stand-in's one allowance.
            raise ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided for "
                                "webhook")
        with self._lock:
            self.webhook = dict(params)
        return True

    async def m_setMyCommands(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        for command in params.get("commands", []):
            name = str(command.get("command", ""))
            if not (1 <= len(name) <= 32 and name.replace("_", "").isalnum()
                    and name == name.lower()) or not 1 <= len(command.get("description",
                                                                          "")) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
        return True

    async def m_getUpdates(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        if self.webhook is not None:
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        offset = int(params.get("offset") or 0)
        limit = int(params.get("limit") or 100)
        timeout = float(params.get("timeout") or 0)
        if self._new_update is None:
            self._new_update = asyncio.Event()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if offset:  # confirms every update before it
                    self._updates = [u for u in self._updates if u["update_id"] >= offset]
                ready = self._updates[:limit]
                self._new_update.clear()
            left = deadline - time.monotonic()
            if ready or left <= 0 or self._closed:
                return ready
            try:
                await asyncio.wait_for(self._new_update.wait(), left)
            except TimeoutError:
                return []

    async def m_sendMessage(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        text = str(params.get("text", ""))
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            raise ApiError(400, "Bad Request: message is too long")
        return self._post(params, text=text)

    async def m_editMessageText(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        text = str(params.get("text", ""))
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        with self._lock:
            chat = self._chat(params)
            message = chat.messages.get(int(params.get("message_id", 0)))
            if message is None or message["from"]["id"] != BOT_USER["id"]:
                raise ApiError(400, "Bad Request: message to edit not found")
            markup = params.get("reply_markup")
            if message.get("text") == text and message.get("reply_markup") == markup:
                raise ApiError(400, NOT_MODIFIED)
            message["text"] = text
            if markup:
                message["reply_markup"] = markup
            else:
                message.pop("reply_markup", None)
            message["edit_date"] = int(time.time())
            chat.edits[message["message_id"]] = chat.edits.get(message["message_id"], 0) + 1
            return dict(message)

    async def m_sendPhoto(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = files.get("photo")
        if data is None:
            raise ApiError(400, "Bad Request: there is no photo in the request")
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except OSError:
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED") from None
        caption = str(params.get("caption", ""))
        if len(caption) > 1024:
            raise ApiError(400, "Bad Request: message caption is too long")
        unique = f"ph{len(data)}x{width}x{height}"
        photo = [{"file_id": f"AgAC{unique}", "file_unique_id": unique, "width": width,
                  "height": height, "file_size": len(data)}]
        return self._post(params, photo=photo, caption=caption, data=data)

    async def m_sendDocument(self, params: dict[str, Any], files: dict[str, bytes]) -> Any:
        data = files.get("document")
        if data is None:
            raise ApiError(400, "Bad Request: there is no document in the request")
        document = {"file_id": f"BQAC{len(data)}", "file_unique_id": f"doc{len(data)}",
                    "file_name": params.get("filename") or "file.png", "mime_type": "image/png",
                    "file_size": len(data)}
        return self._post(params, document=document, data=data)

    async def m_answerCallbackQuery(self, params: dict[str, Any],
                                    files: dict[str, bytes]) -> Any:
        with self._lock:
            if self._queries.pop(str(params.get("callback_query_id")), None) is None:
                raise ApiError(400, "Bad Request: query is too old and response timeout "
                                    "expired or query ID is invalid")
        if len(str(params.get("text", ""))) > 200:
            raise ApiError(400, "Bad Request: MESSAGE_TOO_LONG")
        return True

    def _chat(self, params: dict[str, Any]) -> Chat:
        try:
            return self.chats[int(params.get("chat_id", 0))]
        except (KeyError, ValueError):
            raise ApiError(400, "Bad Request: chat not found") from None

    def _post(self, params: dict[str, Any], *, data: bytes | None = None,
              **content: Any) -> dict[str, Any]:
        """A new bot message in the chat (the Message object Telegram returns)."""
        with self._lock:
            chat = self._chat(params)
            message: dict[str, Any] = {"message_id": next(chat.ids), "from": BOT_USER,
                                       "chat": chat.as_object(), "date": int(time.time()),
                                       **{k: v for k, v in content.items() if v}}
            reply = params.get("reply_parameters") or {}
            if reply:
                replied = chat.messages.get(int(reply.get("message_id", 0)))
                if replied is None and not reply.get("allow_sending_without_reply"):
                    raise ApiError(400, "Bad Request: message to be replied not found")
                if replied is not None:
                    message["reply_to_message"] = {k: v for k, v in replied.items()
                                                   if k != "reply_to_message"}
            if params.get("reply_markup"):
                message["reply_markup"] = params["reply_markup"]
            chat.messages[message["message_id"]] = message
            if data is not None:
                chat.photos[message["message_id"]] = data
            return dict(message)


def _error(exc: ApiError) -> Response:
    return JSONResponse({"ok": False, "error_code": exc.code, "description": exc.description},
                        status_code=exc.code)
