"""`batchserve serve`: flags generated from `Settings`, each also a `BATCHSERVE_*` variable."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from . import __version__
from .settings import Settings, SettingsError, env_name, field_type, flag_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchserve", description=__doc__)
    parser.add_argument("--version", action="version", version=f"batchserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the micro-batching text-to-image server. Every flag can also be set "
        "by its environment variable; flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Settings):
        kind = field_type(f)
        help_text = f"{f.metadata['help']} [env {env_name(f.name)}]"
        if kind is bool:
            serve.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction,
                               default=None, help=f"{help_text} (default: {f.default})")
            continue
        serve.add_argument(
            flag_name(f.name), type=kind, default=None, choices=f.metadata.get("choices"),
            metavar=None if f.metadata.get("choices") else f.name.upper(),
            help=f"{help_text} (default: {f.default})",
        )
    serve.formatter_class = argparse.HelpFormatter
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        settings = Settings.from_sources(overrides)
    except SettingsError as exc:
        print(f"batchserve: invalid setting: {exc}", file=sys.stderr)
        return 2
    from .server import run

    return run(settings)
