"""`batchserve bot slack` as a real process, against a real `batchserve serve` (tiny) and a
stand-in of the Slack Web API (`standins.slack`) that the app reaches through slack-sdk's own
base-URL setting (`--slack-api-url`). Slash commands and events are POSTed to the app signed
with the signing secret, so bolt's real verification runs.

Shown: `/imagine` opens a thread where the status is updated and the image lands with its seed;
a mention is answered in its thread, once even when Slack re-sends the event; unsigned, forged
and stale requests are refused and start nothing; empty and too-long prompts get a sentence and
queue nothing; the secrets never reach the log; exit 0 on SIGTERM."""

from __future__ import annotations

import io
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from conftest import BOT_SERVER_KEY, ROOT, ServerProcess, free_port, require_tool
from standins import BotProcess, jobs_queued
from standins.render import screenshot, slack_html
from standins.slack import SlackStandin

BOT_TOKEN = "xoxb-0000000001-standin-slack-bot-token"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
AUTH = {"Authorization": f"Bearer {BOT_SERVER_KEY}"}


@pytest.fixture(scope="module")
def slack() -> Iterator[SlackStandin]:
    standin = SlackStandin(BOT_TOKEN, SIGNING_SECRET)
    standin.start()
    for channel, name in (("C0GENERAL", "general"), ("C0ART", "art"), ("C0BAD", "bad")):
        standin.channel(channel, name)
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def app_url(slack: SlackStandin, bot_server: ServerProcess,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("slack")
    port = free_port()
    bot = BotProcess(
        "slack", "--server", bot_server.url, "--slack-api-url", f"{slack.url}/api/",
        "--port", str(port), "--fast-steps", "1", "--poll-interval-s", "0.1",
        "--edit-interval-s", "0", "--log-level", "debug",
        env={"BATCHSERVE_SLACK_BOT_TOKEN": BOT_TOKEN,
             "BATCHSERVE_SLACK_SIGNING_SECRET": SIGNING_SECRET,
             "BATCHSERVE_SERVER_API_KEY": BOT_SERVER_KEY},
        log=tmp / "slack-bot.log",
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:  # an external process starting: poll its health endpoint, bounded
        assert bot.alive(), bot.logs()
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, bot.logs()
        time.sleep(0.1)
    yield base + "/slack/events"
    assert bot.stop() == 0, bot.logs()
    logs = bot.logs()
    for secret in (BOT_TOKEN, SIGNING_SECRET, BOT_SERVER_KEY):
        assert secret not in logs


def uploaded(slack: SlackStandin, channel: str, thread_ts: str) -> dict[str, Any]:
    return slack.wait(lambda: next((m for m in slack.thread(channel, thread_ts) if "files" in m),
                                   None), what=f"an image in thread {thread_ts}")


def check_image(slack: SlackStandin, message: dict[str, Any], server: ServerProcess,
                prompt: str) -> None:
    """The uploaded file is the job's 64x64 PNG, its comment naming the job's seed."""
    shared = message["files"][0]
    data = slack.uploads[shared["id"]]["data"]
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (64, 64)
    job_id = shared["name"].removesuffix(".png")
    job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=AUTH).json()
    assert job["status"] == "succeeded" and job["request"]["prompt"] == prompt
    assert message["text"] == f"seed {job['result']['seed']} · 64x64 · fast"
    assert data == httpx.get(f"{server.url}/v1/jobs/{job_id}/image", headers=AUTH).content


def test_imagine_opens_a_thread_with_the_status_and_the_image(
        slack: SlackStandin, app_url: str, bot_server: ServerProcess) -> None:
    answer = slack.command(app_url, "a red fox in the snow", channel="C0GENERAL", user="U0ADA")
    assert answer.status_code == 200 and answer.text == ""  # acknowledged in time, silently
    opening = slack.wait(lambda: next((m for m in slack.channels["C0GENERAL"].messages.values()
                                       if "asked for" in m["text"]), None), what="the opening")
    assert opening["text"] == "<@U0ADA> asked for: a red fox in the snow"
    assert "thread_ts" not in opening
    image = uploaded(slack, "C0GENERAL", opening["ts"])
    check_image(slack, image, bot_server, "a red fox in the snow")
    status = slack.thread("C0GENERAL", opening["ts"])[0]
    assert status["text"].startswith("Done in")
    updates = [c.params["text"] for c in slack.called("chat.update", ts=status["ts"])]
    assert len(updates) >= 2 and updates[0] == "Queued."
    assert slack.channels["C0GENERAL"].updates[status["ts"]] == len(updates)
    # The conversation the guide shows (BATCHSERVE_UPDATE_SCREENSHOT=1 renders it).
    page = slack_html(slack, "C0GENERAL", opening["ts"])
    assert page.count("data:image/png;base64,") == 1 and "Done in" in page
    if os.environ.get("BATCHSERVE_UPDATE_SCREENSHOT"):
        out = ROOT / "docs" / "images" / "bot-slack.png"
        screenshot(page, out, require_tool("chromium", "chromium-browser"), height=440)
        with Image.open(out) as image:
            assert image.size == (560, 440)


def test_a_mention_is_answered_in_its_thread_once(
        slack: SlackStandin, app_url: str, bot_server: ServerProcess) -> None:
    before = jobs_queued(bot_server)
    parent = slack.next_ts()  # the mention is itself a reply in an existing thread
    ts, answer = slack.mention(app_url, "a blue boat", channel="C0ART", user="U0BOB",
                               thread_ts=parent, event_id="Ev0RESENT")
    assert answer.status_code == 200
    _, again = slack.mention(app_url, "a blue boat", channel="C0ART", user="U0BOB",
                             thread_ts=parent, event_id="Ev0RESENT")  # Slack re-sends
    assert again.status_code == 200
    image = uploaded(slack, "C0ART", parent)
    check_image(slack, image, bot_server, "a blue boat")
    replies = slack.thread("C0ART", parent)
    assert [m["user"] for m in replies].count("U0BOB") == 2
    assert sum("files" in m for m in replies) == 1 and ts
    assert jobs_queued(bot_server) - before == 1


@pytest.mark.parametrize("signing", [
    {"sign": False}, {"secret": "not-the-signing-secret"}, {"age_s": 6 * 60},
], ids=["unsigned", "forged", "stale"])
def test_unsigned_forged_and_stale_requests_are_refused(
        slack: SlackStandin, app_url: str, bot_server: ServerProcess,
        signing: dict[str, Any]) -> None:
    before, posted = jobs_queued(bot_server), len(slack.called("chat.postMessage"))
    answer = slack.command(app_url, "a forged prompt", channel="C0BAD", user="U0EVE", **signing)
    assert answer.status_code == 401
    _, event = slack.mention(app_url, "a forged prompt", channel="C0BAD", user="U0EVE",
                             **signing)
    assert event.status_code == 401
    assert len(slack.called("chat.postMessage")) == posted
    assert jobs_queued(bot_server) == before


def test_empty_and_too_long_prompts_get_a_sentence_and_queue_nothing(
        slack: SlackStandin, app_url: str, bot_server: ServerProcess) -> None:
    before = jobs_queued(bot_server)
    empty = slack.command(app_url, "  ", channel="C0GENERAL", user="U0CAT")
    assert "/imagine <prompt>" in empty.text
    nothing = slack.command(app_url, "cancel", channel="C0GENERAL", user="U0CAT")
    assert "You have no image on the way." in nothing.text
    long = "a very long prompt " * 120
    slack.command(app_url, long, channel="C0GENERAL", user="U0CAT")
    opening = slack.wait(lambda: next((m for m in slack.channels["C0GENERAL"].messages.values()
                                       if m["text"].startswith("<@U0CAT>")), None))
    status = slack.wait(lambda: next(
        (m for m in slack.thread("C0GENERAL", opening["ts"])
         if re.search("did not accept", m["text"])), None), what="the refusal")
    assert "prompt" in status["text"] and status["text"].endswith(".")
    assert jobs_queued(bot_server) == before
