"""The `/t2i` request body: strict parsing and validation against the HTTP contract."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from .engines import BatchKey, GenerationItem, key_label
from .errors import MalformedJSON, ValidationError

FORMATS = ("png", "jpeg", "webp")
MAX_SEED = 2**63 - 1
MAX_PROMPT = 2000


@dataclass(frozen=True, slots=True)
class Limits:
    """What the operator allows one request (settings of the same names)."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 150
    default_timeout_s: float = 300.0  # also the most a request may ask for
    max_priority: int = 10  # above it: 422, not clamped (see docs/decisions.md)
    max_cost: int = 0  # width * height * inference_steps; 0: no limit beyond the two above


@dataclass(frozen=True, slots=True)
class T2IRequest:
    prompt: str
    negative_prompt: str
    width: int
    height: int
    inference_steps: int
    guidance_scale: float
    seed: int
    priority: int
    timeout_s: float
    format: str | None
    timeout_given: bool = False
    """The client named its own timeout_s (else learned patience may stand in for it)."""

    @property
    def key(self) -> BatchKey:
        return (self.width, self.height, self.inference_steps, self.guidance_scale)

    @property
    def key_label(self) -> str:
        """The batching key as the request log shows it (no user text)."""
        return key_label(self.key)

    def fields(self) -> dict[str, Any]:
        """The request as its fields (what a job stores and shows): `T2IRequest(**fields)`
        rebuilds it, without the door-side `timeout_given` (a job has no waiting client)."""
        data = dataclasses.asdict(self)
        del data["timeout_given"]
        return data

    def item(self) -> GenerationItem:
        return GenerationItem(
            self.prompt, self.negative_prompt, self.seed, self.width, self.height,
            self.inference_steps, self.guidance_scale,
        )


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer", field=name)
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be between {lo} and {hi}", field=name)
    return value


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"{name} must be a number", field=name)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValidationError(f"{name} must be between {lo:g} and {hi:g}", field=name)
    return float(value)


def _text(name: str, value: Any, *, required: bool) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string", field=name)
    text = value.strip() if required else value
    if required and not text:
        raise ValidationError(f"{name} must not be empty", field=name)
    if len(text) > MAX_PROMPT:
        raise ValidationError(f"{name} must be at most {MAX_PROMPT} characters", field=name)
    if "\x00" in text:
        raise ValidationError(f"{name} must not contain NUL characters", field=name)
    return text


def _side(name: str, value: Any) -> int:
    side = _int(name, value, 64, 2048)
    if side % 8:
        raise ValidationError(f"{name} must be a multiple of 8", field=name)
    return side


def _format(value: Any) -> str:
    if value not in FORMATS:
        raise ValidationError(f"format must be one of {', '.join(FORMATS)}", field="format")
    return str(value)


_FIELDS: dict[str, Callable[[Any, Limits], Any]] = {
    "prompt": lambda v, _: _text("prompt", v, required=True),
    "negative_prompt": lambda v, _: _text("negative_prompt", v, required=False),
    "width": lambda v, _: _side("width", v),
    "height": lambda v, _: _side("height", v),
    "inference_steps": lambda v, lim: _int("inference_steps", v, 1, lim.max_steps),
    "num_inference_steps": lambda v, lim: _int("num_inference_steps", v, 1, lim.max_steps),
    "guidance_scale": lambda v, _: _number("guidance_scale", v, 0.0, 30.0),
    "seed": lambda v, _: _int("seed", v, 0, MAX_SEED),
    "priority": lambda v, lim: _int("priority", v, -10, lim.max_priority),
    "timeout_s": lambda v, lim: _number("timeout_s", v, 0.001, lim.default_timeout_s),
    "format": lambda v, _: _format(v),
}
ALLOWED = tuple(_FIELDS)


def decode(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("body must be a JSON object")
    return data


def parse(body: bytes, limits: Limits) -> T2IRequest:
    """Raises `MalformedJSON` (400) or `ValidationError` (422) naming the field."""
    return validate(decode(body), limits)


def validate(data: dict[str, Any], limits: Limits) -> T2IRequest:
    """`parse` after decoding: for doors whose body carries fields of their own, which they
    pop before handing over the rest (e.g. the jobs door's `webhook`)."""
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r}; allowed fields: {', '.join(ALLOWED)}", field=unknown[0]
        )
    if "prompt" not in data:
        raise ValidationError("prompt is required", field="prompt")
    v = {name: _FIELDS[name](value, limits) for name, value in data.items()}
    steps = _steps(v)
    width, height = v.get("width", 512), v.get("height", 512)
    if width * height > limits.max_pixels:
        raise ValidationError(
            f"width*height = {width * height} exceeds the limit of {limits.max_pixels} pixels",
            field="width",
        )
    cost = width * height * steps
    if limits.max_cost and cost > limits.max_cost:
        raise ValidationError(
            f"width*height*inference_steps = {cost} exceeds this server's cost limit of "
            f"{limits.max_cost}; ask for fewer steps or fewer pixels", field="inference_steps",
        )
    return T2IRequest(
        prompt=v["prompt"],
        negative_prompt=v.get("negative_prompt", ""),
        width=width,
        height=height,
        inference_steps=steps,
        guidance_scale=v.get("guidance_scale", 7.5),
        seed=v["seed"] if "seed" in v else secrets.randbelow(MAX_SEED + 1),
        priority=v.get("priority", 0),
        timeout_s=v.get("timeout_s", limits.default_timeout_s),
        format=v.get("format"),
        timeout_given="timeout_s" in v,
    )


def _steps(v: dict[str, Any]) -> int:
    a, b = v.get("inference_steps"), v.get("num_inference_steps")
    if a is not None and b is not None and a != b:
        raise ValidationError(
            "inference_steps and num_inference_steps differ; send one", field="num_inference_steps"
        )
    steps = a if a is not None else b
    return 20 if steps is None else int(steps)
