"""`batchserve bot telegram`: a Telegram bot (python-telegram-bot) in front of a batchserve URL.

`/txt2img <prompt>` or a plain message makes an image; `/options` shows an inline keyboard
(size from the server's sizes, fast or quality, random or kept seed); `/neg` sets a negative
prompt, `/seed` a fixed seed, `/cancel` cancels. One status message per prompt is edited as the
job moves; the photo comes with its seed in the caption and a button for the PNG as a file.
Long polling by default; with `--webhook-url`, Telegram posts updates to this process's HTTP
endpoint (checked against a secret token). `--telegram-api-url` points it at a self-hosted Bot
API server (the library's own base-URL setting)."""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import secrets
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from telegram import (
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    ReplyParameters,
    Update,
)
from telegram.error import BadRequest, InvalidToken, RetryAfter, TelegramError
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from .chat import MODES, Options
from .client import ServerError
from .lifecycle import Core, Endpoint, Stop, setup_logging
from .settings import TelegramSettings

log = logging.getLogger("batchserve.bots.telegram")
_COMMAND = re.compile(r"^/\S+\s*")
UPDATES = ["message", "callback_query"]
COMMANDS = [
    BotCommand("txt2img", "make an image: /txt2img a red fox in the snow"),
    BotCommand("options", "size, fast or quality, seed"),
    BotCommand("neg", "what to keep out of the images (/neg alone clears it)"),
    BotCommand("seed", "a fixed seed (/seed random to go back)"),
    BotCommand("cancel", "cancel your image on the way"),
    BotCommand("help", "what this bot does"),
]
Context = ContextTypes.DEFAULT_TYPE


class TelegramReply:
    """One prompt's answers in a chat: a status message (sent, then edited) and the photo."""

    def __init__(self, app: Application[Any, Any, Any, Any, Any, Any], chat_id: int,
                 reply_to: int | None) -> None:
        self.bot = app.bot
        self.chat_id = chat_id
        self.reply = (ReplyParameters(reply_to, allow_sending_without_reply=True)
                      if reply_to is not None else None)
        self.message_id: int | None = None

    async def status(self, text: str, *, job_id: str | None = None) -> None:
        markup = None
        if job_id is not None:
            markup = InlineKeyboardMarkup(
                [[InlineKeyboardButton("Cancel", callback_data=f"cancel:{job_id}")]])
        if self.message_id is None:
            sent = await self.bot.send_message(self.chat_id, text, reply_parameters=self.reply,
                                               reply_markup=markup)
            self.message_id = sent.message_id
            return
        try:
            await self.bot.edit_message_text(text, chat_id=self.chat_id,
                                             message_id=self.message_id, reply_markup=markup)
        except BadRequest as exc:
            if "not modified" not in exc.message:
                raise
        except RetryAfter:
            log.info("Telegram asked to slow down; skipping one status edit")

    async def image(self, data: bytes, caption: str, job_id: str) -> None:
        button = InlineKeyboardButton("Send as file (PNG)", callback_data=f"file:{job_id}")
        await self.bot.send_photo(
            self.chat_id, InputFile(data, filename=f"{job_id}.png"), caption=caption,
            reply_parameters=self.reply, reply_markup=InlineKeyboardMarkup([[button]]),
        )


class TelegramBot:
    def __init__(self, settings: TelegramSettings) -> None:
        assert settings.telegram_token is not None  # the settings check it
        self.settings = settings
        self.core = Core(settings)
        self.options: dict[int, Options] = {}
        api = settings.telegram_api_url.rstrip("/")
        builder = (Application.builder().token(settings.telegram_token)
                   .base_url(f"{api}/bot{{token}}").base_file_url(f"{api}/file/bot{{token}}"))
        if settings.webhook_url:
            builder = builder.updater(None)  # updates come through our own endpoint
        self.app = builder.build()
        self.webhook_secret = settings.telegram_webhook_secret or secrets.token_urlsafe(32)
        handlers: list[Any] = [
            CommandHandler(["start", "help"], self.help),
            CommandHandler("txt2img", self.txt2img),
            CommandHandler(["options", "settings"], self.show_options),
            CommandHandler("neg", self.negative),
            CommandHandler("seed", self.seed),
            CommandHandler("cancel", self.cancel),
            MessageHandler(filters.TEXT & ~filters.COMMAND, self.plain),
            # A file download must not hold up the other chats' updates.
            CallbackQueryHandler(self.button, block=False),
        ]
        for handler in handlers:
            self.app.add_handler(handler)
        self.app.add_error_handler(self.on_error)

    # -- commands ----------------------------------------------------------------------------

    async def help(self, update: Update, context: Context) -> None:
        s = self.settings
        limits = (f"Each chat can have {s.max_jobs_per_chat} image"
                  f"{'s' if s.max_jobs_per_chat > 1 else ''} on the way at once")
        if s.daily_limit:
            limits += f", and each person can ask for {s.daily_limit} images a day"
        await self._answer(update, (
            "Send me a description and I will draw it.\n\n"
            "/txt2img <prompt> - make an image (a plain message works too)\n"
            "/options - size, fast or quality, seed\n"
            "/neg <text> - what to keep out of the images (/neg alone clears it)\n"
            "/seed <number> - a fixed seed (/seed random to go back)\n"
            "/cancel - cancel your image on the way\n\n"
            f"{limits}."
        ))

    async def txt2img(self, update: Update, context: Context) -> None:
        prompt = _after_command(update.effective_message)
        if not prompt:
            await self._answer(update, "Send /txt2img followed by what you want to see, for "
                                       "example: /txt2img a red fox in the snow")
            return
        await self._generate(update, prompt)

    async def plain(self, update: Update, context: Context) -> None:
        message = update.effective_message
        if message is not None and message.text:
            await self._generate(update, message.text)

    async def negative(self, update: Update, context: Context) -> None:
        text = _after_command(update.effective_message)
        self._options(update).negative = text
        await self._answer(update, f"Negative prompt set: {text}" if text else
                           "Negative prompt cleared.")

    async def seed(self, update: Update, context: Context) -> None:
        text = _after_command(update.effective_message).lower()
        options = self._options(update)
        if text in ("", "random"):
            options.seed = None
            await self._answer(update, "Each image gets a new random seed.")
        elif text.isdigit() and int(text) < 2**63:
            options.seed = int(text)
            await self._answer(update, f"Seed set to {options.seed}.")
        else:
            await self._answer(update, "A seed is a whole number, for example /seed 42 (or "
                                       "/seed random).")

    async def cancel(self, update: Update, context: Context) -> None:
        chat = update.effective_chat
        if chat is None:
            return
        count = await self.core.jobs.cancel(str(chat.id))
        await self._answer(update, "Cancelling your image." if count == 1 else
                           f"Cancelling your {count} images." if count else
                           "You have no image on the way.")

    async def show_options(self, update: Update, context: Context) -> None:
        message = update.effective_message
        if message is None:
            return
        options = self._options(update)
        await message.reply_text(self._options_text(options),
                                 reply_markup=self._keyboard(options))

    # -- buttons -----------------------------------------------------------------------------

    async def button(self, update: Update, context: Context) -> None:
        query = update.callback_query
        chat = update.effective_chat
        if query is None or chat is None:
            return
        kind, _, value = (query.data or "").partition(":")
        if kind == "file":
            await query.answer("Sending the file...")
            await self._send_file(chat.id, value, query.message)
            return
        if kind == "cancel":
            count = await self.core.jobs.cancel(str(chat.id))
            await query.answer("Cancelling..." if count else "Nothing to cancel.")
            return
        options = self._options(update)
        answer = self._choose(options, kind, value)
        await query.answer(answer)
        if query.message is not None and isinstance(query.message, Message):
            try:
                await query.message.edit_text(self._options_text(options),
                                              reply_markup=self._keyboard(options))
            except BadRequest as exc:
                if "not modified" not in exc.message:
                    raise

    def _choose(self, options: Options, kind: str, value: str) -> str:
        if kind == "size" and value in self.core.info.sizes.presets:
            options.size = value
            return f"Size: {value}"
        if kind == "mode" and value in MODES:
            options.mode = value
            return f"Mode: {value}"
        if kind == "seed" and value == "random":
            options.seed = None
            return "Seed: random"
        if kind == "seed" and value.isdigit():
            options.seed = int(value)
            return f"Seed: {value}"
        return "That choice is no longer offered."

    async def _send_file(self, chat_id: int, job_id: str, message: Any) -> None:
        try:
            data = await self.core.client.image(job_id)
        except ServerError as exc:
            await self.app.bot.send_message(chat_id, exc.sentence)
            return
        reply = None
        if isinstance(message, Message):
            reply = ReplyParameters(message.message_id, allow_sending_without_reply=True)
        await self.app.bot.send_document(chat_id, InputFile(data, filename=f"{job_id}.png"),
                                         reply_parameters=reply)

    def _options_text(self, options: Options) -> str:
        s, sizes = self.settings, self.core.info.sizes
        size = options.size if options.size in sizes.presets else sizes.default
        steps = s.quality_steps if options.mode == "quality" else s.fast_steps
        seed = "random" if options.seed is None else str(options.seed)
        negative = options.negative or "none (set one with /neg <text>)"
        return (f"Options for your next images\n\nSize: {size}\n"
                f"Mode: {options.mode} ({steps} step{'s' if steps != 1 else ''})\n"
                f"Seed: {seed}\n"
                f"Negative prompt: {negative}")

    def _keyboard(self, options: Options) -> InlineKeyboardMarkup:
        sizes = self.core.info.sizes
        chosen = options.size if options.size in sizes.presets else sizes.default

        def button(label: str, data: str, selected: bool) -> InlineKeyboardButton:
            return InlineKeyboardButton(f"• {label}" if selected else label, callback_data=data)

        presets = [button(p, f"size:{p}", p == chosen) for p in sizes.presets]
        rows = [presets[i:i + 3] for i in range(0, len(presets), 3)]
        rows.append([button(m.capitalize(), f"mode:{m}", options.mode == m) for m in MODES])
        seeds = [button("Random seed", "seed:random", options.seed is None)]
        if options.last_seed is not None and options.last_seed != options.seed:
            seeds.append(button(f"Keep seed {options.last_seed}", f"seed:{options.last_seed}",
                                False))
        elif options.seed is not None:
            seeds.append(button(f"Seed {options.seed}", f"seed:{options.seed}", True))
        rows.append(seeds)
        return InlineKeyboardMarkup(rows)

    # -- plumbing ----------------------------------------------------------------------------

    def _options(self, update: Update) -> Options:
        chat = update.effective_chat
        key = chat.id if chat is not None else 0
        return self.options.setdefault(key, Options())

    async def _generate(self, update: Update, prompt: str) -> None:
        chat, user, message = update.effective_chat, update.effective_user, \
            update.effective_message
        if chat is None or message is None:
            return
        user_key = str(user.id if user is not None else chat.id)
        reply = TelegramReply(self.app, chat.id, message.message_id)
        refusal = self.core.jobs.start(str(chat.id), user_key, prompt, self._options(update),
                                       reply)
        if refusal is not None:
            await self._answer(update, refusal)

    async def _answer(self, update: Update, text: str) -> None:
        message = update.effective_message
        if message is not None:
            await message.reply_text(text)

    async def on_error(self, update: object, context: Context) -> None:
        error = context.error
        log.error("handling an update failed: %s", type(error).__name__,
                  exc_info=error if not isinstance(error, TelegramError) else None)
        if isinstance(update, Update) and update.effective_chat is not None:
            with contextlib.suppress(TelegramError):
                await self.app.bot.send_message(
                    update.effective_chat.id, "Something went wrong in the bot. Please try again.")

    # -- process -----------------------------------------------------------------------------

    def webhook_app(self) -> Starlette:
        assert self.settings.webhook_url is not None
        path = urlsplit(self.settings.webhook_url).path or "/"

        async def receive(request: Request) -> Response:
            given = request.headers.get("x-telegram-bot-api-secret-token", "")
            if not hmac.compare_digest(given.encode(), self.webhook_secret.encode()):
                return JSONResponse({"error": "bad secret token"}, status_code=403)
            try:
                update = Update.de_json(await request.json(), self.app.bot)
            except (ValueError, TypeError, KeyError):
                return JSONResponse({"error": "not an update"}, status_code=400)
            await self.app.update_queue.put(update)
            return Response(status_code=200)

        async def healthz(request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        return Starlette(routes=[Route(path, receive, methods=["POST"]),
                                 Route("/healthz", healthz, methods=["GET"])])

    async def main(self) -> int:
        stop = Stop()
        stop.install()
        try:
            await self.app.initialize()  # getMe: checks the token
        except InvalidToken:
            log.error("Telegram refused the bot token (check --telegram-token)")
            return 2
        except TelegramError as exc:
            log.error("cannot reach the Bot API at %s: %s", self.settings.telegram_api_url,
                      type(exc).__name__)
            return 1
        await self.core.start()
        try:
            await self.app.bot.set_my_commands(COMMANDS)
        except TelegramError as exc:
            log.warning("could not set the command menu: %s", exc)
        await self.app.start()
        endpoint = serving = None
        if self.settings.webhook_url:
            endpoint = Endpoint(self.webhook_app(), self.settings.host, self.settings.port)
            serving = await endpoint.start_serving()
            await self.app.bot.set_webhook(self.settings.webhook_url, allowed_updates=UPDATES,
                                           secret_token=self.webhook_secret)
            log.info("telegram bot ready: webhook on %s:%d", self.settings.host,
                     self.settings.port)
        else:
            assert self.app.updater is not None
            await self.app.updater.start_polling(allowed_updates=UPDATES)
            log.info("telegram bot ready: long polling")
        await stop.requested.wait()
        # No new updates: unconfirmed ones stay with Telegram for the next start.
        if endpoint is not None and serving is not None:
            endpoint.should_exit = True  # Telegram re-sends what it cannot deliver meanwhile
            await serving
        elif self.app.updater is not None:
            await self.app.updater.stop()
        await self.core.drain(stop)
        await self.app.stop()
        await self.app.shutdown()
        await self.core.close()
        return 0


def _after_command(message: Message | None) -> str:
    text = message.text if message is not None and message.text else ""
    return _COMMAND.sub("", text, count=1).strip()


def run(settings: TelegramSettings) -> int:
    """Runs the bot until SIGTERM/SIGINT (then drains); the process exit code."""
    import asyncio

    setup_logging(settings)
    return asyncio.run(TelegramBot(settings).main())
