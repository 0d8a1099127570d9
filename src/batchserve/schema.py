"""The one request every door produces: its field table, strict validation, and the JSON Schema
generated from the same table (so `/openapi.json` cannot drift from what the validator does).

`parse` reads `/t2i`'s JSON; `validate` is the core every door calls with a dict of OUR field
names, after translating its own wire names (`aliases` maps ours back to the door's, so an error
names the field the client actually sent).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .engines import BatchKey, GenerationItem, key_label
from .errors import MalformedJSON, ValidationError
from .samplers import DEFAULT_SAMPLER, SAMPLERS

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
    default_sampler: str = DEFAULT_SAMPLER


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
    sampler: str = DEFAULT_SAMPLER
    timeout_given: bool = False
    """The client named its own timeout_s (else learned patience may stand in for it)."""

    @property
    def key(self) -> BatchKey:
        return self.item().key

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
            self.inference_steps, self.guidance_scale, self.sampler,
        )


Bound = int | float | Callable[[Limits], int | float] | None


def _bound(bound: Bound, limits: Limits) -> int | float | None:
    return bound(limits) if callable(bound) else bound


@dataclass(frozen=True, slots=True)
class Field:
    """One request field: its JSON type and rules. `check` and `json_schema` read the same
    attributes, so the validator and the published schema say the same thing."""

    name: str
    type: str  # "string", "integer" or "number"
    doc: str
    default: Any = None  # what an absent field means (documentation; `validate` applies it)
    lo: Bound = None
    hi: Bound = None
    multiple_of: int | None = None
    max_length: int | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False

    def check(self, value: Any, limits: Limits, label: str) -> Any:
        if self.type == "string":
            return self._check_text(value, label)
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            self.type == "integer" and not isinstance(value, int)
        ):
            raise ValidationError(f"{label} must be {_ARTICLE[self.type]}", field=label)
        lo, hi = _bound(self.lo, limits), _bound(self.hi, limits)
        if not math.isfinite(value) or (lo is not None and value < lo) or (
            hi is not None and value > hi
        ):
            raise ValidationError(
                f"{label} must be between {_num(lo)} and {_num(hi)}", field=label
            )
        if self.multiple_of and value % self.multiple_of:
            raise ValidationError(f"{label} must be a multiple of {self.multiple_of}", field=label)
        return value if self.type == "integer" else float(value)

    def _check_text(self, value: Any, label: str) -> str:
        if self.choices is not None:
            if value not in self.choices:
                raise ValidationError(
                    f"{label} must be one of {', '.join(self.choices)}", field=label
                )
            return str(value)
        if not isinstance(value, str):
            raise ValidationError(f"{label} must be a string", field=label)
        text = value.strip() if self.required else value
        if self.required and not text:
            raise ValidationError(f"{label} must not be empty", field=label)
        if self.max_length is not None and len(text) > self.max_length:
            raise ValidationError(
                f"{label} must be at most {self.max_length} characters", field=label
            )
        if "\x00" in text:
            raise ValidationError(f"{label} must not contain NUL characters", field=label)
        return text

    def json_schema(self, limits: Limits, **overrides: Any) -> dict[str, Any]:
        """This field as JSON Schema (OpenAPI 3.1); `overrides` let a door restate its default
        or description while keeping the rules."""
        out: dict[str, Any] = {"type": self.type, "description": self.doc}
        if self.choices is not None:
            out["enum"] = list(self.choices)
        for key, bound in (("minimum", self.lo), ("maximum", self.hi)):
            value = _bound(bound, limits)
            if value is not None:
                out[key] = value
        if self.multiple_of:
            out["multipleOf"] = self.multiple_of
        if self.max_length is not None:
            out["maxLength"] = self.max_length
            if self.required:
                out["pattern"] = r"\S"  # not blank after strip
        default = limits.default_sampler if self.name == "sampler" else self.default
        if default is not None:
            out["default"] = default
        out.update(overrides)
        return out


_ARTICLE = {"integer": "an integer", "number": "a number"}


def _num(value: int | float | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("prompt", "string", "what to draw; 1..2000 characters after strip",
          max_length=MAX_PROMPT, required=True),
    Field("negative_prompt", "string", "what to avoid", default="", max_length=MAX_PROMPT),
    Field("width", "integer", "image width in pixels; width*height <= --max-pixels",
          default=512, lo=64, hi=2048, multiple_of=8),
    Field("height", "integer", "image height in pixels", default=512, lo=64, hi=2048,
          multiple_of=8),
    Field("inference_steps", "integer", "denoising steps (<= --max-steps)", default=20, lo=1,
          hi=lambda lim: lim.max_steps),
    Field("num_inference_steps", "integer", "alias of inference_steps", lo=1,
          hi=lambda lim: lim.max_steps),
    Field("guidance_scale", "number", "classifier-free guidance scale", default=7.5, lo=0.0,
          hi=30.0),
    Field("seed", "integer", "random seed; random when absent (echoed in X-Seed)", lo=0,
          hi=MAX_SEED),
    Field("priority", "integer", "higher runs first (<= --max-priority)", default=0, lo=-10,
          hi=lambda lim: lim.max_priority),
    Field("sampler", "string", "sampler; part of the batching key (default --scheduler)",
          choices=SAMPLERS),
    Field("timeout_s", "number", "the request's budget, queue plus generation, before 504 "
          "(default and most: --request-timeout-s)", lo=0.001,
          hi=lambda lim: lim.default_timeout_s),
    Field("format", "string", "image format; default from Accept, else png", choices=FORMATS),
)}
ALLOWED = tuple(FIELDS)


def decode(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("body must be a JSON object")
    return data


def parse(body: bytes, limits: Limits) -> T2IRequest:
    """`/t2i`: raises `MalformedJSON` (400) or `ValidationError` (422) naming the field."""
    return validate(decode(body), limits)


def validate(
    data: Mapping[str, Any], limits: Limits, aliases: Mapping[str, str] | None = None,
    *, count: int = 1,
) -> T2IRequest:
    """The core: a dict of our field names to one request; an unknown name is refused (a door
    translating its own names passes only ours). `aliases` maps our names to the door's for
    error messages. `count` > 1 reserves seeds seed..seed+count-1 (see `repeat`), so a random
    seed is drawn where they all fit."""
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ValidationError(
            f"unknown field {unknown[0]!r}; allowed fields: {', '.join(ALLOWED)}", field=unknown[0]
        )
    names = aliases or {}

    def label(name: str) -> str:
        return names.get(name, name)

    if "prompt" not in data:
        raise ValidationError(f"{label('prompt')} is required", field=label("prompt"))
    v = {name: FIELDS[name].check(value, limits, label(name)) for name, value in data.items()}
    steps = _steps(v, label)
    width, height = v.get("width", 512), v.get("height", 512)
    if width * height > limits.max_pixels:
        raise ValidationError(
            f"width*height = {width * height} exceeds the limit of {limits.max_pixels} pixels",
            field=label("width"),
        )
    cost = width * height * steps
    if limits.max_cost and cost > limits.max_cost:
        raise ValidationError(
            f"width*height*inference_steps = {cost} exceeds this server's cost limit of "
            f"{limits.max_cost}; ask for fewer steps or fewer pixels",
            field=label("inference_steps"),
        )
    seed = v["seed"] if "seed" in v else secrets.randbelow(MAX_SEED + 2 - count)
    if seed + count - 1 > MAX_SEED:
        raise ValidationError(f"{label('seed')} + {count - 1} images exceeds {MAX_SEED}",
                              field=label("seed"))
    return T2IRequest(
        prompt=v["prompt"],
        negative_prompt=v.get("negative_prompt", ""),
        width=width,
        height=height,
        inference_steps=steps,
        guidance_scale=v.get("guidance_scale", 7.5),
        seed=seed,
        priority=v.get("priority", 0),
        timeout_s=v.get("timeout_s", limits.default_timeout_s),
        format=v.get("format"),
        sampler=v.get("sampler", limits.default_sampler),
        timeout_given="timeout_s" in v,
    )


def repeat(req: T2IRequest, count: int) -> list[T2IRequest]:
    """`count` images of one request with seeds seed, seed+1, ... (as A1111 and our OpenAI door
    number them); `validate(..., count=count)` made sure they fit."""
    return [dataclasses.replace(req, seed=req.seed + i) for i in range(count)]


def _steps(v: dict[str, Any], label: Callable[[str], str]) -> int:
    a, b = v.get("inference_steps"), v.get("num_inference_steps")
    if a is not None and b is not None and a != b:
        raise ValidationError(
            "inference_steps and num_inference_steps differ; send one",
            field=label("num_inference_steps"),
        )
    steps = a if a is not None else b
    return 20 if steps is None else int(steps)


def request_schema(limits: Limits) -> dict[str, Any]:
    """The `/t2i` body as JSON Schema, from `FIELDS`."""
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {name: f.json_schema(limits) for name, f in FIELDS.items()},
    }
