"""`batchserve serve` and `batchserve bot telegram|slack`: flags generated from a settings
dataclass (`Settings`, `bots.settings`), each also a `BATCHSERVE_*` variable."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__
from .bots.settings import SlackSettings, TelegramSettings
from .settings import Settings, SettingsError, env_name, field_type, flag_name, is_secret, load

# (name, settings class, "module:function" run with the settings, help)
BOTS = (
    ("telegram", TelegramSettings, "batchserve.bots.telegram:run",
     "a Telegram bot (/txt2img, options by inline keyboard) in front of a batchserve URL"),
    ("slack", SlackSettings, "batchserve.bots.slack:run",
     "a Slack app (/imagine, app mentions) in front of a batchserve URL"),
)
ENV_NOTE = "Every flag can also be set by its environment variable; flags win."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"batchserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description=f"Run the micro-batching text-to-image server. {ENV_NOTE}",
    )
    add_settings_arguments(serve, Settings)
    serve.set_defaults(_settings=Settings, _run="batchserve.server:run")
    bot = commands.add_parser(
        "bot", help="run a chat bot over a batchserve server's jobs API",
        description="Run a chat bot: a separate process (no model, no torch) that sends the "
        "prompts of its chat to any batchserve URL through the jobs API.",
    )
    bots = bot.add_subparsers(dest="bot", required=True)
    for name, cls, target, help_text in BOTS:
        sub = bots.add_parser(name, help=help_text, description=f"Run {help_text}. {ENV_NOTE}")
        add_settings_arguments(sub, cls)
        sub.set_defaults(_settings=cls, _run=target)
    return parser


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """One flag per field of the settings dataclass `cls` (and `--NAME-file` per secret), its
    help naming the environment variable and the default."""
    for f in dataclasses.fields(cls):
        kind = field_type(f)
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}]"
        default = f.default
        if kind is bool:
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                                default=None, help=f"{help_text} (default: {default})")
            continue
        parser.add_argument(
            flag_name(f.name), type=kind, default=None, choices=f.metadata.get("choices"),
            metavar=None if f.metadata.get("choices") else f.name.upper(),
            help=f"{help_text} (default: {default})",
        )
        if is_secret(f):
            parser.add_argument(
                flag_name(f.name) + "-file", metavar="PATH", default=None,
                help=f"read {flag_name(f.name)} from this file instead "
                f"[env {env_name(f.name)}_FILE]",
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if not k.startswith("_") and k not in ("command", "bot")}
    try:
        settings = load(args._settings, overrides)
    except SettingsError as exc:
        print(f"batchserve: invalid setting: {exc}", file=sys.stderr)
        return 2
    # Imported only now: `bot` must not import the server (nor torch), nor `serve` the bots.
    module, _, function = args._run.partition(":")
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        if args.command != "bot":
            raise
        print(f"batchserve: the bots need their libraries: pip install 'batchserve[bots]' "
              f"({exc})", file=sys.stderr)
        return 2
    run: Callable[[Any], int] = getattr(imported, function)
    return run(settings)
