"""Request validation against the HTTP contract, one table of good and bad bodies."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from batchserve.errors import MalformedJSON, ValidationError
from batchserve.schema import MAX_SEED, Limits, parse

LIMITS = Limits(max_pixels=1024 * 1024, max_steps=150, default_timeout_s=300.0)


def body(**fields: Any) -> bytes:
    return orjson.dumps({"prompt": "a red cube", **fields})


GOOD: list[tuple[bytes, dict[str, Any]]] = [
    (body(), {"width": 512, "height": 512, "inference_steps": 20, "guidance_scale": 7.5,
              "priority": 0, "negative_prompt": "", "timeout_s": 300.0, "format": None}),
    (body(prompt="  padded  "), {"prompt": "padded"}),
    (body(width=64, height=2048),
     {"width": 64, "height": 2048}),
    (body(num_inference_steps=30), {"inference_steps": 30}),
    (body(inference_steps=30, num_inference_steps=30), {"inference_steps": 30}),
    (body(guidance_scale=0), {"guidance_scale": 0.0}),
    (body(guidance_scale=30), {"guidance_scale": 30.0}),
    (body(seed=0), {"seed": 0}),
    (body(seed=MAX_SEED), {"seed": MAX_SEED}),
    (body(priority=-10), {"priority": -10}),
    (body(timeout_s=2.5), {"timeout_s": 2.5}),
    (body(format="webp"), {"format": "webp"}),
    (body(negative_prompt="blurry"), {"negative_prompt": "blurry"}),
    (body(prompt="x" * 2000), {"prompt": "x" * 2000}),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_good_bodies(raw: bytes, expected: dict[str, Any]) -> None:
    req = parse(raw, LIMITS)
    for name, value in expected.items():
        assert getattr(req, name) == value, name


def test_seed_is_random_when_absent() -> None:
    seeds = {parse(body(), LIMITS).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s <= MAX_SEED for s in seeds)


BAD: list[tuple[bytes, str | None]] = [
    (body(step=3), "step"),
    (body(prompt=""), "prompt"),
    (body(prompt="   "), "prompt"),
    (body(prompt="x" * 2001), "prompt"),
    (body(prompt=5), "prompt"),
    (orjson.dumps({"width": 64}), "prompt"),
    (body(negative_prompt="x" * 2001), "negative_prompt"),
    (body(width=513), "width"),
    (body(width=56), "width"),
    (body(width=2056), "width"),
    (body(width="512"), "width"),
    (body(width=512.0), "width"),
    (body(width=True), "width"),
    (body(width=2048, height=2048), "width"),
    (body(inference_steps=0), "inference_steps"),
    (body(inference_steps=151), "inference_steps"),
    (body(inference_steps=20, num_inference_steps=21), "num_inference_steps"),
    (body(guidance_scale=-0.1), "guidance_scale"),
    (body(guidance_scale=30.5), "guidance_scale"),
    (body(guidance_scale="7"), "guidance_scale"),
    (body(guidance_scale=False), "guidance_scale"),
    (body(seed=-1), "seed"),
    (body(seed=MAX_SEED + 1), "seed"),
    (b'{"prompt": "x", "seed": 99999999999999999999999999}', "seed"),
    (body(seed=1.5), "seed"),
    (body(priority=11), "priority"),
    (body(timeout_s=0), "timeout_s"),
    (body(format="gif"), "format"),
    (body(prompt=["a"]), "prompt"),
    (b"[1, 2]", None),
    (b'"just a string"', None),
]


@pytest.mark.parametrize(("raw", "field"), BAD)
def test_bad_bodies_name_the_field(raw: bytes, field: str | None) -> None:
    with pytest.raises(ValidationError) as caught:
        parse(raw, LIMITS)
    assert caught.value.field == field
    assert caught.value.status == 422


@pytest.mark.parametrize("raw", [
    b"", b"{", b'{"prompt": NaN}', b'{"prompt": "x", "width": Infinity}',
    b"[" * 5000 + b"]" * 5000, b'{"prompt": "x",}', b"\xff\xfe",
])
def test_malformed_json_is_400(raw: bytes) -> None:
    with pytest.raises(MalformedJSON) as caught:
        parse(raw, LIMITS)
    assert caught.value.status == 400


def test_unknown_field_message_lists_allowed_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        parse(body(steps=3), LIMITS)
    assert "'steps'" in caught.value.message and "inference_steps" in caught.value.message


def test_max_pixels_and_steps_come_from_limits() -> None:
    small = Limits(max_pixels=256 * 256, max_steps=10)
    with pytest.raises(ValidationError):
        parse(body(width=512, height=256), small)
    with pytest.raises(ValidationError):
        parse(body(inference_steps=11), small)
    assert parse(body(width=256, height=256, inference_steps=10), small).inference_steps == 10


def test_request_key_is_the_batching_key() -> None:
    req = parse(body(width=256, height=128, inference_steps=4, guidance_scale=3), LIMITS)
    assert req.key == (256, 128, 4, 3.0) == req.item().key


@pytest.mark.parametrize(("fields", "field"), [
    ({"priority": 1}, "priority"),
    ({"timeout_s": 30.5}, "timeout_s"),
    ({"width": 64, "height": 64, "inference_steps": 11}, "inference_steps"),
    ({"width": 128, "height": 64, "inference_steps": 6}, "inference_steps"),
])
def test_operator_limits_refuse_what_is_above_them(fields: dict[str, Any], field: str) -> None:
    strict = Limits(default_timeout_s=30.0, max_priority=0, max_cost=64 * 64 * 10)
    with pytest.raises(ValidationError) as caught:
        parse(body(**fields), strict)
    assert caught.value.field == field


def test_operator_limits_accept_what_is_within_them() -> None:
    strict = Limits(default_timeout_s=30.0, max_priority=0, max_cost=64 * 64 * 10)
    req = parse(body(width=64, height=64, inference_steps=10, priority=0, timeout_s=30), strict)
    assert (req.priority, req.timeout_s, req.inference_steps) == (0, 30.0, 10)
    assert parse(body(width=64, height=64, inference_steps=1, priority=-10), strict).priority == -10
    with pytest.raises(ValidationError, match="cost limit of 40960"):
        parse(body(width=64, height=64, inference_steps=11), strict)
