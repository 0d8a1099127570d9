"""The bots' slow-job cases, shown through the Telegram bot (the limits, cancel, drain and retry
code is the bots' shared `chat` and `client`): a server that is down gets a polite answer and
the bot lives on until it is back; a second prompt while one runs is refused; /cancel cancels
the job on the server; SIGTERM lets the image on the way finish, a second SIGTERM cancels what
is left on the server and tells its chat, and the process exits 0.

Slow jobs come from `--model sim` (100 ms per denoising step, `continuous`, so a cancelled job
leaves the batch at the next step); it starts in a second and draws grey images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_bot_telegram import TOKEN, photo_of, said, start_bot, stop_bot

from batchserve.bots.chat import STOPPING

from conftest import BOT_SERVER_KEY, ServerProcess, free_port, running_server
from standins.telegram import TelegramStandin

SIM = ("--model", "sim", "--flush-policy", "continuous", "--sim-step-ms", "100",
       "--api-key", BOT_SERVER_KEY)
AUTH = {"Authorization": f"Bearer {BOT_SERVER_KEY}"}


@pytest.fixture
def telegram() -> Iterator[TelegramStandin]:
    standin = TelegramStandin(TOKEN)
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(*SIM, tmp_path=tmp_path_factory.mktemp("slow")) as server:
        yield server


def polling(telegram: TelegramStandin) -> None:
    telegram.wait(lambda: telegram.called("getUpdates"), what="the bot polling")


def generating(telegram: TelegramStandin, chat: int) -> str:
    """Waits until the chat's status says the job runs; returns the job id (from the status
    message's cancel button)."""
    call = telegram.wait(lambda: next(
        (c for c in telegram.called("editMessageText", chat_id=str(chat))
         if c.params["text"].startswith("Generating")), None), what=f"chat {chat} generating")
    data: str = call.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"]
    assert data.startswith("cancel:job_")
    return data.removeprefix("cancel:")


def job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    record: dict[str, Any] = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).json()
    return record


def test_a_server_down_gets_a_polite_answer_and_the_bot_lives_on(
        telegram: TelegramStandin, tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet
    bot = start_bot(telegram, f"http://127.0.0.1:{port}", tmp_path)
    try:
        polling(telegram)  # it started although the server did not answer /v1/info
        telegram.say(401, "a fox")
        answer = said(telegram, 401, "cannot be reached")
        assert answer == "The image server cannot be reached right now. Please try again in " \
                         "a minute."
        assert bot.alive()
        with running_server(*SIM, tmp_path=tmp_path, port=port):
            telegram.say(401, "a fox, now")
            photo = photo_of(telegram, 401)
            assert photo["caption"].startswith("seed ")
    finally:
        stop_bot(bot)
    assert "could not read the server's /v1/info" in bot.logs()


def test_one_at_a_time_cancel_then_sigterm_finishes_one_image_and_cancels_the_other(
        telegram: TelegramStandin, slow_server: ServerProcess, tmp_path: Path) -> None:
    # fast: 30 steps (3 s); quality: 600 steps (a minute): a drain cannot wait for it.
    bot = start_bot(telegram, slow_server.url, tmp_path, "--fast-steps", "30",
                    "--quality-steps", "600")
    try:
        polling(telegram)
        telegram.say(301, "/cancel")
        said(telegram, 301, "You have no image on the way.")
        for chat in (302, 303):  # both choose quality on the keyboard
            telegram.say(chat, "/options")
            menu = telegram.wait(lambda chat=chat: next(
                (m for m in telegram.bot_messages(chat) if "reply_markup" in m), None),
                what="the keyboard")
            telegram.press(chat, menu["message_id"], "mode:quality")
            telegram.wait(lambda menu=menu, chat=chat: "Mode: quality" in
                          telegram.chats[chat].messages[menu["message_id"]]["text"])

        # One image at a time per chat; /cancel cancels it on the server, the status says so.
        telegram.say(302, "a slow cathedral")
        cancelled = generating(telegram, 302)
        telegram.say(302, "another one, too soon")
        said(telegram, 302, r"^You already have an image on the way\. .*/cancel")
        telegram.say(302, "/cancel")
        said(telegram, 302, "^Cancelling your image.$")
        telegram.wait(lambda: any(c.params["text"] == "Cancelled." for c in telegram.called(
            "editMessageText", chat_id="302")), what="the status saying Cancelled.")
        assert job(slow_server, cancelled)["status"] == "canceled"

        # SIGTERM with a fast and a slow image on the way.
        telegram.say(301, "a quick sketch")
        telegram.say(303, "a slow panorama")
        generating(telegram, 301)
        slow = generating(telegram, 303)
        bot.signal()
        photo_of(telegram, 301)  # the drain let the fast one finish...
        assert bot.alive() and job(slow_server, slow)["status"] == "running"
        bot.signal()  # ...and a second signal ends the drain: the slow one is cancelled
        assert bot.wait() == 0, bot.logs()
        assert telegram.texts(303)[-1] == STOPPING
        assert job(slow_server, slow)["status"] == "canceled"
        assert "drained: 1 finished, 1 cancelled" in bot.logs()
    finally:
        if bot.alive():
            stop_bot(bot)
