"""The log is pure JSON and holds no prompt text unless `--log-prompts`, whichever library wrote
the line: a real tiny-model server in a subprocess, and the filter on its own."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from batchserve.logs import (
    REDACTED,
    JSONFormatter,
    KnownPrompts,
    PromptFilter,
    adopt_library_loggers,
)

from conftest import running_server

SECRET = "zebrapassword42"
# The tiny model's tokenizer has one token per character: far past CLIP's 77 tokens.
LONG_PROMPT = "a watercolour of a lighthouse on a cliff at dawn, " * 4 + SECRET


def log_lines(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            pytest.fail(f"log line is not JSON: {line!r}\n--- whole log ---\n{text}")
    return parsed


def test_long_prompt_secret_never_reaches_the_log_and_every_line_is_json(tmp_path: Path) -> None:
    """The engine tokenizes prompts itself (no library truncation warning any more, in either
    `--long-prompts` mode); what this guards is the whole process: library import and load
    warnings, uvicorn, our own lines — all JSON, none carrying the prompt."""
    with running_server("--model", "tiny", "--max-wait-ms", "0", tmp_path=tmp_path) as server:
        response = httpx.post(server.url + "/t2i", timeout=60, json={
            "prompt": LONG_PROMPT, "negative_prompt": "blurry " * 20 + SECRET,
            "width": 64, "height": 64, "inference_steps": 1, "seed": 3})
        assert response.status_code == 200
        text = server.logs()
    lines = log_lines(text)
    assert SECRET not in text
    loggers = {str(line["logger"]) for line in lines}
    assert "batchserve.access" in loggers and "uvicorn.error" in loggers
    # Libraries' import-time warnings (transformers, without torchvision) came through as JSON.
    assert any(name.split(".")[0] in ("transformers", "diffusers", "py") for name in loggers)


# -- the filter alone ----------------------------------------------------------------------


def render(record: logging.LogRecord, known: KnownPrompts) -> dict[str, object]:
    assert PromptFilter(known).filter(record)
    return dict(orjson.loads(JSONFormatter().format(record)))


def make_record(msg: str, *args: object, name: str = "somelib", exc: bool = False
                ) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"cannot encode {args[0]!s}")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, exc_info)


def test_known_prompts_are_cut_from_messages_args_and_tracebacks() -> None:
    known = KnownPrompts()
    prompt = "A Secret   Garden of glass"
    known.add(prompt)
    line = render(make_record("bad input %s!", "a secret garden\nOF GLASS", exc=True), known)
    assert line["msg"] == f"bad input {REDACTED}!"
    assert "garden" not in str(line["exc"]).lower() and REDACTED in str(line["exc"])
    known.remove(prompt)
    assert len(known) == 0
    assert render(make_record("%s", prompt), known)["msg"] == prompt  # forgotten once answered


def test_prompts_are_counted_so_a_duplicate_stays_known_until_both_end() -> None:
    known = KnownPrompts()
    known.add("same prompt", "same prompt", "ab")  # "ab": too short to redact safely
    known.remove("same prompt")
    assert known.redact("x same prompt y") == f"x {REDACTED} y"
    known.remove("same prompt")
    assert known.redact("x same prompt y") == "x same prompt y" and len(known) == 0


def test_truncation_quote_is_redacted_even_when_the_prompt_is_unknown() -> None:
    message = ("The following part of your input was truncated because CLIP can only handle "
               "sequences up to 77 tokens: ['dawn, zebrapassword42']")
    line = render(make_record(message, name="diffusers.pipelines.x"), KnownPrompts())
    assert line["msg"] == message.split("tokens: ")[0] + "tokens: " + REDACTED


def test_library_loggers_lose_their_own_handlers_and_propagate() -> None:
    lib = logging.getLogger("transformers")
    saved = (list(lib.handlers), lib.propagate)
    stray = logging.StreamHandler()
    lib.addHandler(stray)
    lib.propagate = False
    try:
        adopt_library_loggers(("transformers",))
        assert stray not in lib.handlers and lib.propagate
    finally:
        lib.handlers[:] = saved[0]
        lib.propagate = saved[1]


def test_configured_process_writes_only_json_whoever_logs() -> None:
    """Python warnings, a library's own stderr handler, torch's non-propagating logger and a
    bare `print`-free library record all come out as JSON lines."""
    script = """
import logging, warnings
lib = logging.getLogger("transformers")
lib.addHandler(logging.StreamHandler()); lib.propagate = False   # what transformers does
logging.getLogger("torch").propagate = False                       # what torch does
from batchserve.logs import configure_logging
configure_logging("info")
warnings.warn("careful", UserWarning)
logging.getLogger("transformers.tokenization").warning("from transformers")
logging.getLogger("torch._dynamo").warning("from torch")
logging.getLogger("huggingface_hub").warning("from the hub")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    lines = log_lines(done.stderr)
    assert done.stdout == ""
    assert [line["logger"] for line in lines] == [
        "py.warnings", "transformers.tokenization", "torch._dynamo", "huggingface_hub"]
    assert "careful" in str(lines[0]["msg"])
