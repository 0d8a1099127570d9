"""The one log format: every record (ours, uvicorn's, the libraries', Python warnings) becomes
one JSON line on stderr, and prompt text stays out of it unless `--log-prompts`.

Prompts reach a log by three roads, each closed here: a library quoting its input (the CLIP
truncation warning quotes the cut-off tail of a prompt: `LIBRARY_QUOTES` redacts it), a message or
an exception text that contains a prompt queued or running now (`KNOWN_PROMPTS`, registered by the
service while the request is alive), and our own request log (which adds prompts only when asked).
"""

from __future__ import annotations

import functools
import logging
import logging.config
import re
import threading
import time
from collections import Counter
from typing import Any

import orjson

REDACTED = "[redacted]"

LIBRARY_LOGGERS = ("diffusers", "transformers", "huggingface_hub", "torch")
"""Libraries that install their own stderr handler (plain text) or stop propagation."""

LIBRARY_QUOTES = (
    # diffusers' encode_prompt: "...truncated because CLIP can only handle sequences up to 77
    # tokens: ['<the tail of the prompt>']"; the same wording in every SD-family pipeline.
    re.compile(r"(truncated because .{0,80}? tokens: ).*", re.DOTALL),
)


class KnownPrompts:
    """Prompt texts of requests alive now (queued or generating), counted per occurrence.
    Thread-safe: the engine thread logs while the event loop adds and removes."""

    MIN_LEN = 4  # shorter texts ("a", "cat") would redact ordinary words from every line

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, *texts: str) -> None:
        with self._lock:
            self._counts.update(t for t in map(_norm, texts) if len(t) >= self.MIN_LEN)

    def remove(self, *texts: str) -> None:
        with self._lock:
            for text in map(_norm, texts):
                if self._counts.get(text, 0) > 1:
                    self._counts[text] -= 1
                else:
                    self._counts.pop(text, None)

    def __len__(self) -> int:
        return len(self._counts)

    def redact(self, text: str) -> str:
        with self._lock:
            known = list(self._counts)
        if not known:
            return text
        flat = _norm(text)
        for prompt in known:
            if prompt in flat:  # cheap test first; a pattern only for a line that has one
                text = _pattern(prompt).sub(REDACTED, text)
        return text


@functools.lru_cache(maxsize=256)
def _pattern(prompt: str) -> re.Pattern[str]:
    """The prompt as a library may have copied it: any case, any whitespace between words."""
    return re.compile(r"\s+".join(map(re.escape, prompt.split())), re.IGNORECASE)


def _norm(text: str) -> str:
    return " ".join(text.split()).lower()


KNOWN_PROMPTS = KnownPrompts()


class PromptFilter(logging.Filter):
    """Rewrites each record's message and exception text with prompts removed. Installed on the
    handler, so it sees every record that reaches the log, whichever logger sent it."""

    def __init__(self, known: KnownPrompts = KNOWN_PROMPTS) -> None:
        super().__init__()
        self.known = known

    # Our request log line: its fields are ours and carry prompts only with --log-prompts, when
    # this filter is not installed. Skipping it keeps the per-request cost off the serving path.
    TRUSTED = frozenset({"batchserve.access"})

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in self.TRUSTED and not record.exc_info:
            return True
        message = redact_quotes(record.getMessage())
        record.msg, record.args = self.known.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.known.redact(redact_quotes(record.exc_text))
        return True


class SecretFilter(logging.Filter):
    """Replaces each secret value (a bot token, an API key) wherever a record carries it: a
    library may log a URL with one in it (the Telegram Bot API puts the token in every path)."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        for secret in self.secrets:
            message = message.replace(secret, REDACTED)
            if record.exc_text:
                record.exc_text = record.exc_text.replace(secret, REDACTED)
        record.msg, record.args = message, None
        return True


def redact_quotes(text: str) -> str:
    for pattern in LIBRARY_QUOTES:
        text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
    return text


class JSONFormatter(logging.Formatter):
    """One JSON object per line; `extra={"fields": {...}}` adds structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_text:
            line["exc"] = record.exc_text
        elif record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(
    level: str, *, log_prompts: bool = False, secrets: tuple[str, ...] = ()
) -> None:
    """Root handler with the JSON formatter (and, unless `log_prompts`, the prompt filter;
    with `secrets`, the filter that keeps them out); Python warnings go through logging; library
    loggers already imported are adopted (engines call `adopt_library_loggers` again once they
    have imported theirs)."""
    handler: dict[str, Any] = {"class": "logging.StreamHandler", "formatter": "json",
                               "filters": []}
    if not log_prompts:
        handler["filters"].append("prompts")
    if secrets:
        handler["filters"].append("secrets")
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": JSONFormatter}},
        "filters": {"prompts": {"()": PromptFilter},
                    "secrets": {"()": SecretFilter, "secrets": secrets}},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": level.upper()},
        "loggers": {"uvicorn.access": {"level": "WARNING"}},
    })
    logging.captureWarnings(True)
    adopt_library_loggers()


def adopt_library_loggers(names: tuple[str, ...] = LIBRARY_LOGGERS) -> None:
    """Removes the handlers a library put on its own root logger and lets its records propagate
    to ours. diffusers, transformers and huggingface_hub add a plain stderr handler once (on
    import) and remember it, so removing it after the import is final; torch stops propagation
    and, with no handler, Python would print its warnings through the plain-text last resort."""
    for name in names:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
