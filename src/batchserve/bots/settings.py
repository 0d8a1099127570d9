"""The bots' settings: one frozen dataclass per bot, made by the server's machinery
(`batchserve.settings.setting`), so each field is a flag, a `BATCHSERVE_*` variable and a line of
`--help` (`cli.add_settings_arguments`). Tokens and secrets are `secret` fields: never shown,
and readable from a file (`--telegram-token-file`)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..settings import SettingsError, check_choices, flag_name, is_secret, rule, setting

Check = Callable[[Any], None]
_HTTP_URL = re.compile(r"^https?://[^/\s]+")


@dataclass(frozen=True, slots=True)
class BotSettings:
    """What both bots share: the server they send jobs to, their HTTP endpoint, the limits
    per chat and user, and how they follow jobs."""

    server: str = setting(
        "http://127.0.0.1:8000",
        "batchserve base URL the bot sends jobs to (one server, or the address in front of a "
        "cluster)",
    )
    server_api_key: str | None = setting(
        None, "Bearer key for the server's jobs API (the server's --api-key)", secret=True
    )
    host: str = setting(
        "127.0.0.1", "bind address of the bot's HTTP endpoint (Slack's events and commands; "
        "Telegram's webhook mode)"
    )
    port: int = setting(3000, "bind port of that endpoint")
    max_jobs_per_chat: int = setting(
        1, "images one chat may have on the way at once; more are refused politely"
    )
    daily_limit: int = setting(
        100, "images one user may ask for per UTC day (refused ones do not count); 0: no cap"
    )
    fast_steps: int = setting(12, "inference steps of the fast choice (the default)")
    quality_steps: int = setting(30, "inference steps of the quality choice")
    poll_interval_s: float = setting(
        1.0, "seconds between two reads of a job when the server offers no event stream"
    )
    edit_interval_s: float = setting(
        1.0, "least seconds between two progress edits of one status message (chat services "
        "rate-limit edits); a change of state is always shown"
    )
    retry_budget_s: float = setting(
        120.0, "how long a prompt waits for a busy server (429/503, waiting its Retry-After "
        "between tries) before the bot gives up and says so"
    )
    job_timeout_s: float = setting(
        900.0, "a job not finished this long after it was accepted is cancelled on the server "
        "and its chat told"
    )
    info_refresh_s: float = setting(
        300.0, "seconds between two reads of the server's /v1/info (sizes offered, limits)"
    )
    drain_timeout_s: float = setting(
        60.0, "on SIGTERM: jobs on the way may finish this long (a second signal ends it at "
        "once); what is left is cancelled on the server and its chat told"
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))

    checks: ClassVar[tuple[Check, ...]] = (
        check_choices,
        rule("server", lambda v: bool(_HTTP_URL.match(v)), "must be an http:// or https:// URL"),
        rule("server_api_key", lambda v: v is None or len(v) >= 8,
             "must be at least 8 characters"),
        rule("port", lambda v: 0 <= v <= 65535, "must be 0..65535"),
        rule("max_jobs_per_chat", lambda v: 1 <= v <= 100, "must be 1..100"),
        rule("daily_limit", lambda v: v >= 0, "must be >= 0 (0: no cap)"),
        rule("fast_steps", lambda v: 1 <= v <= 1000, "must be 1..1000"),
        rule("quality_steps", lambda v: 1 <= v <= 1000, "must be 1..1000"),
        rule("poll_interval_s", lambda v: 0.05 <= v <= 60, "must be 0.05..60"),
        rule("edit_interval_s", lambda v: 0 <= v <= 60, "must be 0..60"),
        rule("retry_budget_s", lambda v: v >= 0, "must be >= 0"),
        rule("job_timeout_s", lambda v: v > 0, "must be > 0"),
        rule("info_refresh_s", lambda v: v >= 1, "must be >= 1"),
        rule("drain_timeout_s", lambda v: v >= 0, "must be >= 0"),
    )

    def __post_init__(self) -> None:
        for check in type(self).checks:
            check(self)

    @property
    def secrets(self) -> tuple[str, ...]:
        """The secret values set, for the log filter that keeps them out of every line."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self) if is_secret(f))
        return tuple(v for v in values if isinstance(v, str) and v)


def _required(name: str, env: str) -> Check:
    def check(s: Any) -> None:
        if not getattr(s, name):
            raise SettingsError(
                f"{flag_name(name)} is required (or {env}, or {flag_name(name)}-file)"
            )

    return check


@dataclass(frozen=True, slots=True)
class TelegramSettings(BotSettings):
    telegram_token: str | None = setting(
        None, "the bot's token from @BotFather (required)", secret=True
    )
    telegram_api_url: str = setting(
        "https://api.telegram.org",
        "Bot API server: Telegram's, or a self-hosted telegram-bot-api server",
    )
    webhook_url: str | None = setting(
        None, "public HTTPS URL Telegram posts updates to (webhook mode; its path is served on "
        "--host/--port behind your TLS proxy); unset: long polling"
    )
    telegram_webhook_secret: str | None = setting(
        None, "secret Telegram sends with each webhook update (X-Telegram-Bot-Api-Secret-Token); "
        "a random one per start when unset", secret=True
    )

    checks: ClassVar[tuple[Check, ...]] = (
        *BotSettings.checks,
        _required("telegram_token", "BATCHSERVE_TELEGRAM_TOKEN"),
        rule("telegram_api_url", lambda v: bool(_HTTP_URL.match(v)),
             "must be an http:// or https:// URL"),
        rule("webhook_url", lambda v: v is None or bool(_HTTP_URL.match(v)),
             "must be an https:// URL (Telegram requires HTTPS; http:// only for a local "
             "Bot API server)"),
        rule("telegram_webhook_secret",
             lambda v: v is None or re.fullmatch(r"[A-Za-z0-9_-]{1,256}", v) is not None,
             "must be 1..256 characters A-Z, a-z, 0-9, _ and - (Telegram's rule)"),
    )


@dataclass(frozen=True, slots=True)
class SlackSettings(BotSettings):
    slack_bot_token: str | None = setting(
        None, "the app's bot token, xoxb-... (required)", secret=True
    )
    slack_signing_secret: str | None = setting(
        None, "the app's signing secret; every request to the bot is verified with it "
        "(required)", secret=True
    )
    slack_api_url: str = setting(
        "https://slack.com/api/", "Slack Web API base URL (a stand-in or a proxy for tests)"
    )

    checks: ClassVar[tuple[Check, ...]] = (
        *BotSettings.checks,
        _required("slack_bot_token", "BATCHSERVE_SLACK_BOT_TOKEN"),
        _required("slack_signing_secret", "BATCHSERVE_SLACK_SIGNING_SECRET"),
        rule("slack_api_url", lambda v: bool(_HTTP_URL.match(v)),
             "must be an http:// or https:// URL"),
    )
