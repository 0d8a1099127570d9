"""The bots' settings come from the server's machinery (a flag, a BATCHSERVE_* variable and a
--help line per field); secrets come from the environment or a file and never show; a bot
process imports no torch."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from batchserve.bots.settings import SlackSettings, TelegramSettings
from batchserve.cli import build_parser, main
from batchserve.settings import Settings, SettingsError, env_name, flag_name, load

TOKEN = "123456789:AAF-secret-token-value"


def parser_of(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
    return parser


def help_of(*path: str) -> str:
    return parser_of(*path).format_help()


@pytest.mark.parametrize(("kind", "cls"), [("telegram", TelegramSettings),
                                           ("slack", SlackSettings)])
def test_every_bot_setting_is_a_flag_with_its_env_variable(kind: str, cls: type) -> None:
    text = help_of("bot", kind)
    for f in dataclasses.fields(cls):
        assert flag_name(f.name) in text and env_name(f.name) in text
    for flag in ("--server", "--server-api-key", "--server-api-key-file", "--host", "--port"):
        assert flag in text
    assert "`" not in " ".join(text.split())


def test_flags_win_over_env_and_secrets_can_come_from_files(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"BATCHSERVE_TELEGRAM_TOKEN_FILE": str(token_file),
           "BATCHSERVE_SERVER": "http://env:8000", "BATCHSERVE_DAILY_LIMIT": "5"}
    s = load(TelegramSettings, {"server": "http://flag:8000"}, env=env)
    assert (s.server, s.daily_limit, s.telegram_token) == ("http://flag:8000", 5, TOKEN)
    assert TOKEN not in repr(s) and s.secrets == (TOKEN,)
    with pytest.raises(SettingsError, match="BATCHSERVE_TELEGRAM_TOKEN and "
                                            "BATCHSERVE_TELEGRAM_TOKEN_FILE are both set"):
        load(TelegramSettings, env={**env, "BATCHSERVE_TELEGRAM_TOKEN": TOKEN})
    with pytest.raises(SettingsError, match="--telegram-token-file='/nonexistent'"):
        load(TelegramSettings, {"telegram_token_file": "/nonexistent"}, env={})


def test_the_server_reads_its_secrets_from_files_too(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("server-key-from-a-file\n")
    s = Settings.from_sources({"api_key_file": str(key)}, env={})
    assert s.api_key == "server-key-from-a-file" and s.public()["api_key"] == "set"
    assert "--api-key-file" in help_of("serve")


def test_a_bad_or_missing_secret_is_named_never_shown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="--telegram-token is required"):
        load(TelegramSettings, env={})
    with pytest.raises(SettingsError, match="--slack-signing-secret is required"):
        load(SlackSettings, {"slack_bot_token": "xoxb-1"}, env={})
    with pytest.raises(SettingsError) as short:
        load(TelegramSettings, {"telegram_token": TOKEN, "server_api_key": "short"}, env={})
    assert str(short.value) == "--server-api-key=<hidden>: must be at least 8 characters"
    assert main(["bot", "telegram", "--telegram-token", TOKEN, "--server", "ftp://x"]) == 2
    err = capsys.readouterr().err
    assert "--server='ftp://x': must be an http:// or https:// URL" in err and TOKEN not in err


NO_TORCH = textwrap.dedent("""
    import json, sys
    import batchserve.cli
    from batchserve.bots.settings import SlackSettings, TelegramSettings
    from batchserve.bots.slack import SlackBot
    from batchserve.bots.telegram import TelegramBot
    TelegramBot(TelegramSettings(telegram_token="1:x"))
    SlackBot(SlackSettings(slack_bot_token="xoxb-1", slack_signing_secret="s"))
    heavy = sorted(m for m in sys.modules
                   if m.split(".")[0] in ("torch", "diffusers", "transformers"))
    server = sorted(m for m in sys.modules if m in ("batchserve.server", "batchserve.service"))
    print(json.dumps({"heavy": heavy, "server": server}))
""")


def test_a_bot_imports_no_torch_and_no_server_code() -> None:
    done = subprocess.run([sys.executable, "-c", NO_TORCH], capture_output=True, text=True,
                          timeout=120, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"heavy": [], "server": []}


def test_the_bot_settings_reference_lists_every_flag() -> None:
    from batchserve import docgen

    table = docgen.bot_settings_page()
    for kind in ("telegram", "slack"):
        flags = {s for a in parser_of("bot", kind)._actions for s in a.option_strings
                 if s not in ("-h", "--help")}
        assert "--telegram-token-file" in flags or "--slack-bot-token-file" in flags
        assert [flag for flag in flags if f"`{flag}`" not in table] == [], kind
