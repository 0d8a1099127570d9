"""The stand-ins' recorded conversations as small HTML pages, and a headless-Chromium screenshot
of one: how docs/images/bot-telegram.png and docs/images/bot-slack.png are made
(`BATCHSERVE_UPDATE_SCREENSHOT=1 pytest tests/test_bot_telegram.py tests/test_bot_slack.py
-k screenshot`)."""

from __future__ import annotations

import base64
import html
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from standins.slack import BOT_USER_ID, SlackStandin
from standins.telegram import BOT_USER, TelegramStandin

STYLE = """
body { margin: 0; font: 15px/1.4 "DejaVu Sans", sans-serif; }
.bar { padding: 12px 16px; font-weight: bold; color: #fff; }
.msg { margin: 8px 16px; max-width: 70%; padding: 8px 12px; border-radius: 12px;
       white-space: pre-wrap; box-shadow: 0 1px 1px rgba(0,0,0,.15); }
img.photo { display: block; width: 192px; height: auto; image-rendering: pixelated;
            border-radius: 8px; margin-bottom: 6px; }
.keys { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 6px; }
.keys span { flex: 1; text-align: center; padding: 5px 8px; border-radius: 6px;
             background: rgba(0,0,0,.08); font-size: 13px; }
.note { font-size: 12px; color: #777; }
"""


def _image(data: bytes) -> str:
    return f'<img class="photo" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def telegram_html(standin: TelegramStandin, chat_id: int) -> str:
    """The chat as Telegram's clients show it: the user's messages right, the bot's left, the
    photo with its caption and the inline keyboards under their messages."""
    chat = standin.chats[chat_id]
    rows = []
    for message in chat.messages.values():
        mine = message["from"]["id"] != BOT_USER["id"]
        body = ""
        if message["message_id"] in chat.photos and "photo" in message:
            body += _image(chat.photos[message["message_id"]])
        body += html.escape(message.get("text") or message.get("caption") or "")
        keys = message.get("reply_markup", {}).get("inline_keyboard", [])
        for row in keys:
            body += '<div class="keys">' + "".join(
                f"<span>{html.escape(b['text'])}</span>" for b in row) + "</div>"
        if message.get("edit_date"):
            body += ' <span class="note">edited</span>'
        side = "margin-left:auto;background:#e3fdd0" if mine else "background:#fff"
        rows.append(f'<div class="msg" style="{side}">{body}</div>')
    return (f"<!doctype html><html><head><meta charset=utf-8><style>{STYLE}</style></head>"
            f'<body style="background:#c6d7a8"><div class="bar" style="background:#517da2">'
            f"batchserve bot</div>{''.join(rows)}</body></html>")


def slack_html(standin: SlackStandin, channel_id: str, thread_ts: str) -> str:
    """The channel message that opened a thread, and the thread (as Slack's thread pane)."""
    channel = standin.channels[channel_id]

    def row(message: dict[str, Any]) -> str:
        bot = message.get("user") == BOT_USER_ID
        name = "batchserve" if bot else message.get("user", "")
        text = html.escape(message.get("text") or "")
        text = text.replace("&lt;@", "@").replace("&gt;", "")
        files = "".join(_image(standin.uploads[f["id"]]["data"])
                        for f in message.get("files", []) if standin.uploads[f["id"]]["data"])
        edited = ' <span class="note">(edited)</span>' if message.get("edited") else ""
        avatar = "#2eb67d" if bot else "#e01e5a"
        return (f'<div style="display:flex;gap:10px;margin:10px 16px">'
                f'<div style="width:36px;height:36px;border-radius:6px;background:{avatar}">'
                f'</div><div><b>{html.escape(name)}</b><div style="white-space:pre-wrap">'
                f"{text}{edited}</div>{files}</div></div>")

    opening = channel.messages[thread_ts]
    replies = standin.thread(channel_id, thread_ts)
    return (f"<!doctype html><html><head><meta charset=utf-8><style>{STYLE}</style></head>"
            f'<body style="background:#fff"><div class="bar" style="background:#3f0e40">'
            f"# {html.escape(channel.name)}</div>{row(opening)}"
            f'<div style="margin-left:40px;border-left:3px solid #ddd">'
            f'<div class="note" style="margin:4px 16px">Thread</div>'
            f"{''.join(row(m) for m in replies)}</div></body></html>")


def screenshot(page: str, out: Path, chromium: str, *, width: int = 560,
               height: int = 640) -> None:
    """Renders `page` in headless Chromium into the PNG `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "page.html"
        source.write_text(page, encoding="utf-8")
        subprocess.run([
            chromium, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp}/profile", "--hide-scrollbars",
            "--force-device-scale-factor=1", f"--window-size={width},{height}",
            f"--screenshot={out}", source.as_uri(),
        ], check=True, capture_output=True, timeout=120)
