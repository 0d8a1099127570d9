"""`batchserve bot telegram` as a real process, against a real `batchserve serve` (tiny) and a
stand-in of the Bot API (`standins.telegram`) that the bot reaches through the library's own
base-URL setting (`--telegram-api-url`, as for a self-hosted Bot API server). The tests play
users and wait on the calls the bot makes, never on time.

Shown: a prompt in, a photo out with the right size and its seed; the status message edited as
the job moves; the options keyboard, /neg and /seed change the request; a daily cap; bad prompts
answered with a sentence and nothing queued; the PNG as a file on request; webhook mode with its
secret token; the token never in the log; exit 0 on SIGTERM. The slow-job cases (one image at a
time per chat, cancel, drain on SIGTERM, a server down) are in test_bot_lifecycle.py."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from batchserve.bots.chat import SENDING

from conftest import BOT_SERVER_KEY, ROOT, ServerProcess, free_port, require_tool
from standins import BotProcess, jobs_queued
from standins.render import screenshot, telegram_html
from standins.telegram import TelegramStandin

TOKEN = "123456789:AAF-standin-telegram-token_0123456789"
AUTH = {"Authorization": f"Bearer {BOT_SERVER_KEY}"}


def start_bot(telegram: TelegramStandin, server_url: str, tmp: Path, *extra: str,
              name: str = "bot") -> BotProcess:
    key_file = tmp / f"{name}.key"
    key_file.write_text(BOT_SERVER_KEY + "\n")  # read from a file, as a mounted secret
    return BotProcess(
        "telegram", "--server", server_url, "--server-api-key-file", str(key_file),
        "--telegram-api-url", telegram.url, "--fast-steps", "1", "--quality-steps", "2",
        "--poll-interval-s", "0.1", "--edit-interval-s", "0", "--log-level", "debug", *extra,
        env={"BATCHSERVE_TELEGRAM_TOKEN": TOKEN}, log=tmp / f"{name}.log",
    )


def stop_bot(bot: BotProcess) -> None:
    assert bot.stop() == 0, bot.logs()
    logs = bot.logs()
    assert TOKEN not in logs and TOKEN.split(":")[1] not in logs
    assert BOT_SERVER_KEY not in logs


@pytest.fixture(scope="module")
def telegram() -> Iterator[TelegramStandin]:
    standin = TelegramStandin(TOKEN)
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def bot(telegram: TelegramStandin, bot_server: ServerProcess,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    process = start_bot(telegram, bot_server.url, tmp_path_factory.mktemp("telegram"),
                        "--daily-limit", "3")
    telegram.wait(lambda: telegram.called("getUpdates"), what="the bot polling")
    yield process
    stop_bot(process)


def photo_of(telegram: TelegramStandin, chat: int, count: int = 1) -> dict[str, Any]:
    """The chat's `count`-th photo message, once sent."""
    return telegram.wait(
        lambda: len(photos := [m for m in telegram.bot_messages(chat) if "photo" in m]) >= count
        and photos[count - 1], what=f"photo {count} in chat {chat}")


def said(telegram: TelegramStandin, chat: int, pattern: str) -> str:
    return telegram.wait(lambda: next((t for t in telegram.texts(chat)
                                       if re.search(pattern, t)), None),
                         what=f"{pattern!r} in chat {chat}")


def job_of(photo: dict[str, Any], server: ServerProcess) -> dict[str, Any]:
    """The server's record of the job behind a photo (its id rides on the file button)."""
    data = photo["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    assert data.startswith("file:job_")
    job: dict[str, Any] = httpx.get(f"{server.url}/v1/jobs/{data[5:]}", headers=AUTH).json()
    return job


def test_a_prompt_makes_a_photo_of_the_size_asked_with_its_seed(
        telegram: TelegramStandin, bot: BotProcess, bot_server: ServerProcess) -> None:
    chat = 101
    asked = telegram.say(chat, "/txt2img a red fox in the snow")
    photo = photo_of(telegram, chat)
    data = telegram.chats[chat].photos[photo["message_id"]]
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 64)  # the server's default size under --max-pixels 8192
    job = job_of(photo, bot_server)
    assert job["status"] == "succeeded" and job["request"]["prompt"] == "a red fox in the snow"
    assert photo["caption"].startswith(f"seed {job['result']['seed']} · 64x64 · fast")
    assert photo["reply_to_message"]["message_id"] == asked["message_id"]
    # One status message, sent first and then edited as the job moved (the edits each changed
    # something: the stand-in refuses an edit that does not, as Telegram does).
    status = next(m for m in telegram.bot_messages(chat) if "text" in m)
    assert status["message_id"] < photo["message_id"]
    assert telegram.called("sendMessage", chat_id=str(chat))[0].params["text"] == SENDING
    edits = [c.params["text"] for c in telegram.called("editMessageText", chat_id=str(chat))]
    assert len(edits) >= 2 and edits[0] == "Queued." and edits[-1].startswith("Done in")
    assert telegram.chats[chat].edits[status["message_id"]] == len(edits)
    assert "reply_markup" not in status  # the cancel button went when the job ended


def test_the_png_comes_as_a_file_on_request(telegram: TelegramStandin, bot: BotProcess,
                                            bot_server: ServerProcess) -> None:
    chat = 102
    telegram.say(chat, "a lighthouse at night")
    photo = photo_of(telegram, chat)
    job_id = job_of(photo, bot_server)["id"]
    query = telegram.press(chat, photo["message_id"], f"file:{job_id}")
    document = telegram.wait(lambda: next((m for m in telegram.bot_messages(chat)
                                           if "document" in m), None), what="the file")
    sent = telegram.chats[chat].photos[document["message_id"]]
    original = httpx.get(f"{bot_server.url}/v1/jobs/{job_id}/image", headers=AUTH).content
    assert sent == original and sent.startswith(b"\x89PNG")
    assert telegram.called("answerCallbackQuery", callback_query_id=query)


def test_options_neg_and_seed_change_the_request(telegram: TelegramStandin, bot: BotProcess,
                                                 bot_server: ServerProcess) -> None:
    chat = 103
    telegram.say(chat, "/options")
    menu = telegram.wait(lambda: next((m for m in telegram.bot_messages(chat)
                                       if "reply_markup" in m), None), what="the keyboard")
    labels = [b["text"] for row in menu["reply_markup"]["inline_keyboard"] for b in row]
    assert labels[:3] == ["• 64x64", "96x64", "64x96"]  # derived from the server's max_pixels
    assert "• Fast" in labels and "Quality" in labels and "• Random seed" in labels
    for data in ("size:96x64", "mode:quality"):
        telegram.press(chat, menu["message_id"], data)
    telegram.wait(lambda: "Mode: quality" in telegram.chats[chat].messages[
        menu["message_id"]]["text"], what="the menu showing the choices")
    assert "Size: 96x64" in telegram.chats[chat].messages[menu["message_id"]]["text"]
    telegram.say(chat, "/neg blurry, text")
    telegram.say(chat, "/seed 42")
    said(telegram, chat, "Seed set to 42")
    telegram.say(chat, "a castle on a hill")
    photo = photo_of(telegram, chat)
    with Image.open(io.BytesIO(telegram.chats[chat].photos[photo["message_id"]])) as image:
        assert image.size == (96, 64)
    request = job_of(photo, bot_server)["request"]
    assert (request["width"], request["height"], request["inference_steps"]) == (96, 64, 2)
    assert request["negative_prompt"] == "blurry, text" and request["seed"] == 42
    assert photo["caption"] == "seed 42 · 96x64 · quality"


def test_a_daily_cap_per_person(telegram: TelegramStandin, bot: BotProcess,
                                bot_server: ServerProcess) -> None:
    chat, before = 104, jobs_queued(bot_server)
    for count, prompt in enumerate(("first", "second", "third"), start=1):
        telegram.say(chat, prompt)
        photo_of(telegram, chat, count)
    telegram.say(chat, "fourth")
    refusal = said(telegram, chat, "today's limit of 3 images")
    assert "midnight UTC" in refusal
    assert jobs_queued(bot_server) - before == 3  # the refusal never reached the server


def test_bad_prompts_get_a_sentence_and_nothing_is_queued(
        telegram: TelegramStandin, bot: BotProcess, bot_server: ServerProcess) -> None:
    chat, before = 105, jobs_queued(bot_server)
    telegram.say(chat, "/txt2img")
    said(telegram, chat, r"^Send /txt2img followed by what you want to see")
    telegram.say(chat, "a very long prompt " * 120)  # 2,280 characters: over the server's 2,000
    refusal = said(telegram, chat, "did not accept")
    assert "prompt" in refusal and "Traceback" not in refusal and refusal.endswith(".")
    assert jobs_queued(bot_server) == before
    telegram.say(chat, "a short prompt")  # neither counted against the daily cap nor blocking
    photo_of(telegram, chat)


def test_help_lists_the_commands_and_the_limits(telegram: TelegramStandin,
                                                bot: BotProcess) -> None:
    chat = 106
    telegram.say(chat, "/start")
    text = said(telegram, chat, "/txt2img")
    for command in ("/options", "/neg", "/seed", "/cancel"):
        assert command in text
    assert "1 image on the way at once" in text and "3 images a day" in text
    menu = telegram.called("setMyCommands")[0].params["commands"]
    assert {c["command"] for c in menu} >= {"txt2img", "options", "neg", "seed", "cancel"}


def test_webhook_mode_takes_updates_only_with_the_secret_token(
        bot_server: ServerProcess, tmp_path: Path) -> None:
    telegram = TelegramStandin(TOKEN)
    telegram.start()
    port = free_port()
    webhook = f"http://127.0.0.1:{port}/telegram/updates"
    bot = start_bot(telegram, bot_server.url, tmp_path, "--webhook-url", webhook,
                    "--port", str(port), name="webhook-bot")
    try:
        registered = telegram.wait(lambda: telegram.called("setWebhook"), what="setWebhook")
        secret = registered[0].params["secret_token"]
        assert registered[0].params["url"] == webhook and len(secret) >= 32
        assert not telegram.called("getUpdates")
        telegram.say(201, "/help")
        said(telegram, 201, "/txt2img")
        forged = {"update_id": 99, "message": {
            "message_id": 50, "date": 0, "text": "/help", "chat": {"id": 202, "type": "private"},
            "entities": [{"type": "bot_command", "offset": 0, "length": 5}]}}
        for headers in ({}, {"X-Telegram-Bot-Api-Secret-Token": "not-the-secret"}):
            answer = httpx.post(webhook, content=json.dumps(forged), headers=headers)
            assert answer.status_code == 403
    finally:
        stop_bot(bot)
        telegram.stop()
    assert not telegram.called("sendMessage", chat_id="202")  # the forged update was dropped


def test_screenshot_of_a_conversation(telegram: TelegramStandin, bot: BotProcess,
                                      tmp_path: Path) -> None:
    """The conversation the guide shows: options chosen on the keyboard, then a prompt.
    BATCHSERVE_UPDATE_SCREENSHOT=1 also renders it in Chromium into docs/images/."""
    chat = 107
    telegram.say(chat, "/options")
    menu = telegram.wait(lambda: next((m for m in telegram.bot_messages(chat)
                                       if "reply_markup" in m), None), what="the keyboard")
    telegram.press(chat, menu["message_id"], "size:96x64")
    telegram.wait(lambda: "Size: 96x64" in telegram.chats[chat].messages[
        menu["message_id"]]["text"], what="the menu showing the size")
    telegram.say(chat, "/txt2img a lighthouse on a cliff at dusk")
    photo_of(telegram, chat)
    page = telegram_html(telegram, chat)
    assert page.count("data:image/png;base64,") == 1
    for shown in ("Size: 96x64", "• 96x64", "Done in", "seed ", "Send as file (PNG)",
                  "a lighthouse on a cliff at dusk"):
        assert shown in page
    if os.environ.get("BATCHSERVE_UPDATE_SCREENSHOT"):
        out = ROOT / "docs" / "images" / "bot-telegram.png"
        screenshot(page, out, require_tool("chromium", "chromium-browser"), height=690)
        with Image.open(out) as image:
            assert image.size == (560, 690)
