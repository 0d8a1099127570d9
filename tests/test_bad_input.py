"""Bad input, table-driven: each case gets the right 4xx in the one JSON error shape, nothing is
queued or generated, and the same server then still answers a good request."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest
from inprocess import InProcess, in_process

from fakes import FakeEngine

GOOD = b'{"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "inference_steps": 1}'
JSON = {"content-type": "application/json"}
MAX_BODY = 65536  # the default --max-body-bytes


def j(**fields: object) -> bytes:
    """A body: the good request with `fields` replaced (a value of `...` removes the field)."""
    data = orjson.loads(GOOD)
    data.update(fields)
    return orjson.dumps({k: v for k, v in data.items() if v is not ...})


@dataclass(frozen=True)
class Case:
    id: str
    body: bytes | None
    status: int
    code: str
    field: str | None = None
    headers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JSON))
    method: str = "POST"
    path: str = "/t2i"
    chunked: bool = False  # send without Content-Length


def _deep(levels: int) -> bytes:
    return b'{"prompt": ' + b"[" * levels + b"]" * levels + b"}"


CASES = [
    # transport: content type and size
    Case("no-content-type", GOOD, 415, "unsupported_media_type", headers={}),
    Case("text-plain", GOOD, 415, "unsupported_media_type", headers={"content-type": "text/plain"}),
    Case("form-urlencoded", b"prompt=x", 415, "unsupported_media_type",
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("multipart", GOOD, 415, "unsupported_media_type",
         headers={"content-type": "multipart/form-data; boundary=x"}),
    Case("text-json", GOOD, 415, "unsupported_media_type", headers={"content-type": "text/json"}),
    Case("body-too-large", j(prompt="x" * MAX_BODY), 413, "body_too_large"),
    Case("body-too-large-chunked", j(prompt="x" * MAX_BODY), 413, "body_too_large",
         chunked=True),
    # not JSON
    Case("empty-body", b"", 400, "malformed_json"),
    Case("truncated", b'{"prompt": "a"', 400, "malformed_json"),
    Case("trailing-garbage", GOOD + b" x", 400, "malformed_json"),
    Case("single-quotes", b"{'prompt': 'a'}", 400, "malformed_json"),
    Case("not-utf8", b'{"prompt": "\xff\xfe"}', 400, "malformed_json"),
    Case("lone-surrogate", b'{"prompt": "\\ud800"}', 400, "malformed_json"),
    Case("nan", GOOD[:-1] + b', "guidance_scale": NaN}', 400, "malformed_json"),
    Case("infinity", GOOD[:-1] + b', "guidance_scale": Infinity}', 400, "malformed_json"),
    Case("minus-infinity", GOOD[:-1] + b', "timeout_s": -Infinity}', 400, "malformed_json"),
    Case("overflowing-float", GOOD[:-1] + b', "guidance_scale": 1e400}', 400, "malformed_json"),
    Case("nesting-past-parser-limit", _deep(5000), 400, "malformed_json"),
    # JSON, but not an object
    Case("array", b"[1, 2]", 422, "validation_error"),
    Case("string", b'"draw a cat"', 422, "validation_error"),
    Case("null", b"null", 422, "validation_error"),
    Case("number", b"42", 422, "validation_error"),
    # prompt
    Case("missing-prompt", j(prompt=...), 422, "validation_error", "prompt"),
    Case("prompt-null", j(prompt=None), 422, "validation_error", "prompt"),
    Case("prompt-number", j(prompt=7), 422, "validation_error", "prompt"),
    Case("prompt-list", j(prompt=["a", "b"]), 422, "validation_error", "prompt"),
    Case("prompt-empty", j(prompt=""), 422, "validation_error", "prompt"),
    Case("prompt-blank", j(prompt=" \t\n "), 422, "validation_error", "prompt"),
    Case("prompt-too-long", j(prompt="x" * 2001), 422, "validation_error", "prompt"),
    Case("prompt-nul", j(prompt="a\x00b"), 422, "validation_error", "prompt"),
    Case("prompt-deeply-nested", _deep(1000), 422, "validation_error", "prompt"),
    Case("negative-too-long", j(negative_prompt="x" * 2001), 422, "validation_error",
         "negative_prompt"),
    Case("negative-object", j(negative_prompt={"a": 1}), 422, "validation_error",
         "negative_prompt"),
    # unknown fields
    Case("unknown-step", j(step=20), 422, "validation_error", "step"),
    Case("unknown-model", j(model="sdxl"), 422, "validation_error", "model"),
    # size
    Case("width-not-multiple-of-8", j(width=513), 422, "validation_error", "width"),
    Case("width-too-small", j(width=32), 422, "validation_error", "width"),
    Case("width-too-large", j(width=4096), 422, "validation_error", "width"),
    Case("width-string", j(width="512"), 422, "validation_error", "width"),
    Case("width-float", j(width=512.0), 422, "validation_error", "width"),
    Case("width-bool", j(width=True), 422, "validation_error", "width"),
    Case("height-negative", j(height=-512), 422, "validation_error", "height"),
    Case("height-huge-int", j(height=2**64 - 1), 422, "validation_error", "height"),
    Case("pixels-over-max", j(width=2048, height=1024), 422, "validation_error", "width"),
    # steps
    Case("steps-zero", j(inference_steps=0), 422, "validation_error", "inference_steps"),
    Case("steps-over-max", j(inference_steps=151), 422, "validation_error", "inference_steps"),
    Case("steps-bool", j(inference_steps=False), 422, "validation_error", "inference_steps"),
    Case("steps-alias-over-max", j(inference_steps=..., num_inference_steps=1000), 422,
         "validation_error", "num_inference_steps"),
    Case("steps-and-alias-differ", j(num_inference_steps=2), 422, "validation_error",
         "num_inference_steps"),
    # guidance
    Case("guidance-negative", j(guidance_scale=-0.5), 422, "validation_error", "guidance_scale"),
    Case("guidance-over-max", j(guidance_scale=30.5), 422, "validation_error", "guidance_scale"),
    Case("guidance-string", j(guidance_scale="7.5"), 422, "validation_error", "guidance_scale"),
    Case("guidance-bool", j(guidance_scale=True), 422, "validation_error", "guidance_scale"),
    # seed
    Case("seed-negative", j(seed=-1), 422, "validation_error", "seed"),
    Case("seed-2-63", j(seed=2**63), 422, "validation_error", "seed"),
    Case("seed-past-64-bits", GOOD[:-1] + b', "seed": ' + b"9" * 40 + b"}", 422,
         "validation_error", "seed"),
    Case("seed-float", j(seed=1.5), 422, "validation_error", "seed"),
    Case("seed-bool", j(seed=True), 422, "validation_error", "seed"),
    # priority, timeout, format
    Case("priority-over-max", j(priority=11), 422, "validation_error", "priority"),
    Case("priority-string", j(priority="high"), 422, "validation_error", "priority"),
    Case("timeout-zero", j(timeout_s=0), 422, "validation_error", "timeout_s"),
    Case("timeout-negative", j(timeout_s=-5), 422, "validation_error", "timeout_s"),
    Case("timeout-huge", j(timeout_s=1e300), 422, "validation_error", "timeout_s"),
    Case("timeout-bool", j(timeout_s=True), 422, "validation_error", "timeout_s"),
    Case("format-gif", j(format="gif"), 422, "validation_error", "format"),
    Case("format-null", j(format=None), 422, "validation_error", "format"),
    Case("format-upper", j(format="PNG"), 422, "validation_error", "format"),
    # routing
    Case("get-t2i", None, 405, "method_not_allowed", method="GET"),
    Case("unknown-path", GOOD, 404, "not_found", path="/v1/t2i"),
]
# 4xx that reach /t2i's parser count as batchserve_requests_rejected_total{reason="invalid"}
COUNTED = [c for c in CASES if c.status in (400, 413, 415, 422)]


async def send(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    content: bytes | AsyncIterator[bytes] | None = case.body
    if case.chunked and case.body is not None:
        payload = case.body

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 8192):
                yield payload[start:start + 8192]

        content = chunks()
    return await client.request(case.method, case.path, content=content, headers=case.headers)


def check(case: Case, response: httpx.Response) -> None:
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    data = response.json()
    assert set(data) == {"error"}
    error = data["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["code"] == case.code
    assert isinstance(error["message"], str) and error["message"]
    assert error["field"] == case.field
    for leak in ("Traceback", "File \"", "site-packages", "/work/", "batchserve/"):
        assert leak not in response.text
    if case.field is not None:
        assert case.field in error["message"]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input_gets_a_clean_4xx(case: Case) -> None:
    engine = FakeEngine()
    async with in_process(engine) as app:
        check(case, await send(app.client, case))
        assert engine.batches == [] and app.service.batcher.depth == 0


async def test_unknown_field_message_lists_the_allowed_fields() -> None:
    async with in_process() as app:
        response = await app.client.post("/t2i", content=j(step=20), headers=JSON)
        message = response.json()["error"]["message"]
        assert "'step'" in message and "inference_steps" in message and "prompt" in message


async def test_max_pixels_and_max_steps_follow_the_settings() -> None:
    async with in_process(max_pixels=128 * 128, max_steps=4, max_wait_ms=0) as app:
        cases = [
            (j(width=128, height=136), 422, "width"),
            (j(inference_steps=5), 422, "inference_steps"),
            (j(width=128, height=128, inference_steps=4), 200, None),
        ]
        for content, status, name in cases:
            response = await app.client.post("/t2i", content=content, headers=JSON)
            assert response.status_code == status
            if name is not None:
                assert response.json()["error"]["field"] == name


async def test_priority_timeout_and_cost_limits_follow_the_settings() -> None:
    engine = FakeEngine()
    async with in_process(engine, max_priority=2, request_timeout_s=60, max_cost=64 * 64 * 4,
                          max_wait_ms=0) as app:
        cases = [
            (j(priority=3), 422, "priority"),
            (j(timeout_s=61), 422, "timeout_s"),
            (j(width=128, height=64, inference_steps=3), 422, "inference_steps"),
        ]
        for content, status, name in cases:
            response = await app.client.post("/t2i", content=content, headers=JSON)
            assert response.status_code == status
            assert response.json()["error"]["field"] == name
        assert engine.batches == []  # nothing refused was queued
        ok = await app.client.post("/t2i", headers=JSON, content=j(
            priority=2, timeout_s=60, width=64, height=64, inference_steps=4))
        assert ok.status_code == 200
        limits = (await app.client.get("/v1/info")).json()["limits"]
        assert (limits["max_priority"], limits["max_cost"]) == (2, 64 * 64 * 4)


async def test_max_body_bytes_follows_the_setting() -> None:
    async with in_process(max_body_bytes=1024, max_wait_ms=0) as app:
        big = await app.client.post("/t2i", content=j(prompt="x" * 1100), headers=JSON)
        assert big.status_code == 413
        fits = await app.client.post("/t2i", content=j(prompt="x" * 900), headers=JSON)
        assert fits.status_code == 200


@pytest.fixture
async def shared() -> AsyncIterator[InProcess]:
    async with in_process(FakeEngine(), max_wait_ms=0) as app:
        yield app


async def test_one_server_takes_the_whole_table_then_still_serves(shared: InProcess) -> None:
    for case in CASES:
        check(case, await send(shared.client, case))
    assert shared.engine.batches == []
    invalid = shared.metric("batchserve_requests_rejected_total", reason="invalid")
    assert invalid == len(COUNTED)
    good = await shared.client.post("/t2i", content=GOOD, headers=JSON)
    assert good.status_code == 200 and good.headers["content-type"] == "image/png"
    assert good.content.startswith(b"\x89PNG")
    assert (await shared.client.get("/readyz")).status_code == 200
