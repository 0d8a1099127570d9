"""The one request every door produces: its field table, strict validation, and the JSON Schema
generated from the same table (so `/openapi.json` cannot drift from what the validator does).

`parse` reads `/t2i`'s JSON; `validate` is the core every door calls with a dict of OUR field
names, after translating its own wire names (`aliases` maps ours back to the door's, so an error
names the field the client actually sent). Image fields (`init_image`, `mask_image`) are decoded
here too, through `images`, after every cheaper check passed; a door calls `validate` off the
event loop when its body carries one.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from . import images
from .engines import BatchKey, GenerationItem, key_label
from .engines.capabilities import IMG2IMG, INPAINT
from .engines.protocol import ImageInput, LoraPick
from .errors import MalformedJSON, ValidationError
from .images import MaskRule
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
    samplers: tuple[str, ...] = SAMPLERS
    """The samplers the served model can use (`families.served_samplers`)."""
    max_input_pixels: int = 4096 * 4096  # an init image or mask, checked from its header
    image_inputs: frozenset[str] = frozenset()
    """What the served model takes besides a prompt (`engines.capabilities.image_inputs`)."""
    size_multiple: int = 8
    """Width and height must be multiples of it (the latent grid: VAE scale factor 8)."""
    default_size: tuple[int, int] = (512, 512)
    """width x height of a request that names none: the model family's (SDXL: 1024x1024)."""
    refiner: bool = False
    """An SDXL refiner is loaded (`--refiner`): requests may set `refiner_switch`."""
    max_loras: int = 4
    """Most adapters one request may name in `loras` (`--max-loras-per-request`)."""
    lora_problem: Callable[[str], str | None] | None = None
    """What is wrong with naming a LoRA of `--lora-dir` (None: usable); None: no --lora-dir."""


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
    init: ImageInput | None = None
    """img2img / inpainting: the decoded init image (and mask) at width x height."""
    refiner_switch: float = 0.0
    """0 < x < 1 hands the last steps to the refiner; 0: none."""
    loras: tuple[LoraPick, ...] = ()
    """Per-request LoRA: files of `--lora-dir` with their scales; not in the batching key."""

    @property
    def key(self) -> BatchKey:
        return self.item().key

    @property
    def key_label(self) -> str:
        """The batching key as the request log shows it (no user text)."""
        return key_label(self.key)

    def fields(self) -> dict[str, Any]:
        """The request as its fields (what a job stores and shows), without the door-side
        `timeout_given` (a job has no waiting client) and without pixels: an init image is
        described by its size, `strength` and `mask_blur`; its pixels are `pixels()`, stored
        apart; `refiner_switch` only when set. `from_fields(fields, pixels)` rebuilds the
        request."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("timeout_given", "init")}
        if not self.refiner_switch:
            del data["refiner_switch"]  # a request without the refiner reads as before it
        if self.loras:
            data["loras"] = [{"name": p.name, "scale": p.scale} for p in self.loras]
        else:
            del data["loras"]  # likewise without LoRA
        if (init := self.init) is not None:
            size = {"width": init.width, "height": init.height}
            data.update(init_image=size, strength=init.strength)
            if init.mask is not None:
                data.update(mask_image=size, mask_blur=init.mask_blur)
        return data

    def pixels(self) -> bytes | None:
        """The init image's pixels, then the mask's, as one blob (None without an init
        image): what a job keeps beside its record."""
        if self.init is None:
            return None
        return self.init.rgb + (self.init.mask or b"")

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], pixels: bytes | None = None) -> T2IRequest:
        """The request `fields()` and `pixels()` described. Raises TypeError or ValueError
        when they do not fit together (a record of another version, a lost or torn blob)."""
        plain = dict(data)
        size, mask = plain.pop("init_image", None), plain.pop("mask_image", None)
        strength, blur = plain.pop("strength", None), plain.pop("mask_blur", 0)
        loras = tuple(LoraPick(str(p["name"]), float(p["scale"]))
                      for p in plain.pop("loras", ()))
        init = None
        if size is not None:
            width, height = int(size["width"]), int(size["height"])
            rgb = width * height * 3
            expected = rgb + (width * height if mask is not None else 0)
            if pixels is None or len(pixels) != expected:
                raise ValueError(f"the init image's pixels are missing or torn "
                                 f"({0 if pixels is None else len(pixels)} of {expected} bytes)")
            init = ImageInput(width, height, pixels[:rgb], float(strength),
                              pixels[rgb:] if mask is not None else None, int(blur))
        return cls(**plain, init=init, loras=loras)

    def item(self) -> GenerationItem:
        return GenerationItem(
            self.prompt, self.negative_prompt, self.seed, self.width, self.height,
            self.inference_steps, self.guidance_scale, self.sampler, self.init,
            self.refiner_switch, self.loras,
        )


Bound = int | float | Callable[[Limits], int | float] | None


def _bound(bound: Bound, limits: Limits) -> int | float | None:
    return bound(limits) if callable(bound) else bound


@dataclass(frozen=True, slots=True)
class Field:
    """One request field: its JSON type and rules. `check` and `json_schema` read the same
    attributes, so the validator and the published schema say the same thing."""

    name: str
    type: str  # "string", "integer", "number" or "image" (base64 in JSON, bytes in multipart)
    doc: str
    default: Any = None  # what an absent field means (documentation; `validate` applies it)
    lo: Bound = None
    hi: Bound = None
    multiple_of: Bound = None
    max_length: int | None = None
    choices: tuple[str, ...] | Callable[[Limits], tuple[str, ...]] | None = None
    required: bool = False
    lo_exclusive: bool = False  # `lo` itself is out of range (strength: 0 < s)
    hi_exclusive: bool = False  # `hi` itself is out of range (refiner_switch: x < 1)

    def check(self, value: Any, limits: Limits, label: str) -> Any:
        if self.type == "string":
            return self._check_text(value, limits, label)
        if self.type == "loras":
            return _check_loras(value, limits, label)
        if self.type == "image":
            if not isinstance(value, str | bytes):
                raise ValidationError(f"{label} must be a base64 string", field=label)
            return value  # decoded by `validate`, once every cheaper check has passed
        if isinstance(value, bool) or not isinstance(value, int | float) or (
            self.type == "integer" and not isinstance(value, int)
        ):
            raise ValidationError(f"{label} must be {_ARTICLE[self.type]}", field=label)
        lo, hi = _bound(self.lo, limits), _bound(self.hi, limits)
        if not math.isfinite(value) or (lo is not None and (
            value <= lo if self.lo_exclusive else value < lo
        )) or (hi is not None and (value >= hi if self.hi_exclusive else value > hi)):
            if self.lo_exclusive or self.hi_exclusive:
                low = "greater than" if self.lo_exclusive else "at least"
                high = "less than" if self.hi_exclusive else "at most"
                raise ValidationError(f"{label} must be {low} {_num(lo)} and {high} "
                                      f"{_num(hi)}", field=label)
            raise ValidationError(
                f"{label} must be between {_num(lo)} and {_num(hi)}", field=label
            )
        multiple = _bound(self.multiple_of, limits)
        if multiple and value % multiple:
            raise ValidationError(f"{label} must be a multiple of {multiple}", field=label)
        return value if self.type == "integer" else float(value)

    def allowed(self, limits: Limits) -> tuple[str, ...] | None:
        """The values a field with choices takes (the sampler's follow the served model)."""
        return self.choices(limits) if callable(self.choices) else self.choices

    def _check_text(self, value: Any, limits: Limits, label: str) -> str:
        choices = self.allowed(limits)
        if choices is not None:
            if value not in choices:
                raise ValidationError(f"{label} must be one of {', '.join(choices)}",
                                      field=label)
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
        if self.type == "image":
            out.update(type="string", contentEncoding="base64")
        if self.type == "loras":
            out.update(type="array", maxItems=limits.max_loras, items={
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "description": "a LoRA of --lora-dir (its file "
                             "stem), as GET /v1/loras lists them"},
                    "scale": {"type": "number", "minimum": -LORA_SCALE, "maximum": LORA_SCALE,
                              "default": 1.0},
                }})
        if (choices := self.allowed(limits)) is not None:
            out["enum"] = list(choices)
        lowest = "exclusiveMinimum" if self.lo_exclusive else "minimum"
        highest = "exclusiveMaximum" if self.hi_exclusive else "maximum"
        for key, bound in ((lowest, self.lo), (highest, self.hi)):
            value = _bound(bound, limits)
            if value is not None:
                out[key] = value
        if multiple := _bound(self.multiple_of, limits):
            out["multipleOf"] = multiple
        if self.max_length is not None:
            out["maxLength"] = self.max_length
            if self.required:
                out["pattern"] = r"\S"  # not blank after strip
        default = _limit_defaults(limits).get(self.name, self.default)
        if default is not None:
            out["default"] = default
        out.update(overrides)
        return out


def _limit_defaults(limits: Limits) -> dict[str, Any]:
    """Defaults that follow the served model: its sampler, its family's size."""
    width, height = limits.default_size
    return {"sampler": limits.default_sampler, "width": width, "height": height}


_ARTICLE = {"integer": "an integer", "number": "a number"}


def _num(value: int | float | None) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


FIELDS: dict[str, Field] = {f.name: f for f in (
    Field("prompt", "string", "what to draw; 1..2000 characters after strip",
          max_length=MAX_PROMPT, required=True),
    Field("negative_prompt", "string", "what to avoid", default="", max_length=MAX_PROMPT),
    Field("width", "integer", "image width in pixels; width*height <= --max-pixels; with an "
          "init_image and no width, its width rounded down", default=512, lo=64, hi=2048,
          multiple_of=lambda lim: lim.size_multiple),
    Field("height", "integer", "image height in pixels; with an init_image and no height, its "
          "height rounded down", default=512, lo=64, hi=2048,
          multiple_of=lambda lim: lim.size_multiple),
    Field("inference_steps", "integer", "denoising steps (<= --max-steps)", default=20, lo=1,
          hi=lambda lim: lim.max_steps),
    Field("num_inference_steps", "integer", "alias of inference_steps", lo=1,
          hi=lambda lim: lim.max_steps),
    Field("guidance_scale", "number", "classifier-free guidance scale (a guidance-distilled "
          "model's guidance input: FLUX.1)", default=7.5, lo=0.0, hi=30.0),
    Field("seed", "integer", "random seed; random when absent (echoed in X-Seed)", lo=0,
          hi=MAX_SEED),
    Field("priority", "integer", "higher runs first (<= --max-priority)", default=0, lo=-10,
          hi=lambda lim: lim.max_priority),
    Field("sampler", "string", "sampler, one the served model can use (flow-matching models: "
          "flow-euler); part of the batching key (default --scheduler)",
          choices=lambda lim: lim.samplers),
    Field("timeout_s", "number", "the request's budget, queue plus generation, before 504 "
          "(default and most: --request-timeout-s)", lo=0.001,
          hi=lambda lim: lim.default_timeout_s),
    Field("format", "string", "image format; default from Accept, else png", choices=FORMATS),
    Field("init_image", "image", "img2img: the image to start from, base64 PNG, JPEG or WebP "
          "(a data: URL prefix allowed; no remote URLs), at most --max-input-pixels; stretched "
          "to width x height (A1111's resize_mode 0)"),
    Field("strength", "number", "with init_image: how much of it is repainted; the item runs "
          "the last int(steps * strength) of its steps", default=0.75, lo=0.0, hi=1.0,
          lo_exclusive=True),
    Field("mask_image", "image", "inpainting: a mask of init_image's size, base64 like it; "
          "white is repainted, black kept (a mask with transparency: its opaque pixels)"),
    Field("mask_blur", "integer", "with mask_image: Gaussian blur radius of the mask, in output "
          "pixels", default=4, lo=0, hi=64),
    Field("refiner_switch", "number", "with --refiner: the fraction of the steps after which "
          "the SDXL refiner takes over (base denoising_end = refiner denoising_start); part of "
          "the batching key", lo=0.0, hi=1.0, lo_exclusive=True, hi_exclusive=True),
    Field("loras", "loras", "with --lora-dir: per-request LoRA, a list of {name, scale} "
          "(at most --max-loras-per-request, scale -4..4, default 1); not part of the batching "
          "key: requests with different LoRAs share one batch"),
)}
ALLOWED = tuple(FIELDS)
IMAGE_FIELDS = ("init_image", "mask_image")
_IMAGE_ONLY = ("strength", "mask_blur")  # meaningless without the image they shape


def decode(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedJSON(f"body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("body must be a JSON object")
    return data


def has_images(data: Mapping[str, Any]) -> bool:
    """Whether a body of our field names carries an image to decode."""
    return any(name in data for name in IMAGE_FIELDS)


def parse(body: bytes, limits: Limits) -> T2IRequest:
    """`/t2i`: raises `MalformedJSON` (400) or `ValidationError` (422) naming the field."""
    return validate(decode(body), limits)


def validate(
    data: Mapping[str, Any], limits: Limits, aliases: Mapping[str, str] | None = None,
    *, count: int = 1, masks: MaskRule = MaskRule.WHITE,
) -> T2IRequest:
    """The core: a dict of our field names to one request; an unknown name is refused (a door
    translating its own names passes only ours). `aliases` maps our names to the door's for
    error messages. `count` > 1 reserves seeds seed..seed+count-1 (see `repeat`), so a random
    seed is drawn where they all fit. `masks` is how the door's mask marks what to repaint.

    An init image is decoded only after every other check passed (it is the costly part); it
    blocks for as long as decoding takes, so doors call this off the event loop then."""
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
    _check_image_fields(v, steps, limits, label)
    _check_refiner(v, limits, label)
    # The size is known before decoding unless a side comes from the init image.
    derived = "init_image" in v and not ("width" in v and "height" in v)
    width, height = (v.get(side, default) for side, default in
                     zip(("width", "height"), limits.default_size, strict=True))
    if not derived:
        _check_area(width, height, steps, limits, label, derived=False)
    decoded = None
    if "init_image" in v:
        decoded = images.decode(
            v["init_image"], v.get("mask_image"), max_pixels=limits.max_input_pixels,
            rule=masks, init_label=label("init_image"), mask_label=label("mask_image"))
        if decoded.mask is not None and INPAINT not in limits.image_inputs:
            # OpenAI's rule: an image's own transparent pixels ask for inpainting too.
            raise _cannot(label("mask_image" if "mask_image" in v else "init_image"),
                          "inpainting (a mask)")
        if derived:
            width, height = _size_of(v, decoded, limits, label)
            _check_area(width, height, steps, limits, label, derived=True)
    seed = v["seed"] if "seed" in v else secrets.randbelow(MAX_SEED + 2 - count)
    if seed + count - 1 > MAX_SEED:
        raise ValidationError(f"{label('seed')} + {count - 1} images exceeds {MAX_SEED}",
                              field=label("seed"))
    init = None
    if decoded is not None:
        init = images.fit(decoded, width, height, strength=v.get("strength", 0.75),
                          mask_blur=v.get("mask_blur", 4))
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
        init=init,
        refiner_switch=v.get("refiner_switch", 0.0),
        loras=v.get("loras", ()),
    )


LORA_SCALE = 4.0


def _check_loras(value: Any, limits: Limits, label: str) -> tuple[LoraPick, ...]:
    """`loras`: a list of {name, scale}; every name a usable file of `--lora-dir`."""
    if not isinstance(value, list):
        raise ValidationError(f"{label} must be a list of {{name, scale}} objects", field=label)
    if value and limits.lora_problem is None:
        raise ValidationError(f"{label}: this server serves no per-request LoRA (start it with "
                              "--lora-dir)", field=label)
    if len(value) > limits.max_loras:
        raise ValidationError(f"{label}: at most {limits.max_loras} LoRAs per request "
                              "(--max-loras-per-request)", field=label)
    picks: list[LoraPick] = []
    for i, pick in enumerate(value):
        at = f"{label}[{i}]"
        if not isinstance(pick, dict):
            raise ValidationError(f"{at} must be an object {{name, scale}}", field=at)
        extra = sorted(set(pick) - {"name", "scale"})
        if extra:
            raise ValidationError(f"{at}: unknown field {extra[0]!r}; allowed: name, scale",
                                  field=f"{at}.{extra[0]}")
        name, scale = pick.get("name"), pick.get("scale", 1.0)
        if not isinstance(name, str):
            raise ValidationError(f"{at}.name must be a string", field=f"{at}.name")
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not (
            math.isfinite(scale) and -LORA_SCALE <= scale <= LORA_SCALE
        ):
            raise ValidationError(f"{at}.scale must be a number between {-LORA_SCALE:g} and "
                                  f"{LORA_SCALE:g}", field=f"{at}.scale")
        if any(p.name == name for p in picks):
            raise ValidationError(f"{at}.name: {name!r} is named twice", field=f"{at}.name")
        assert limits.lora_problem is not None
        problem = limits.lora_problem(name)
        if problem is not None:
            raise ValidationError(f"{at}.name: {problem}", field=f"{at}.name")
        picks.append(LoraPick(name, float(scale)))
    return tuple(picks)


def _check_refiner(v: dict[str, Any], limits: Limits, label: Callable[[str], str]) -> None:
    if "refiner_switch" not in v:
        return
    if not limits.refiner:
        raise ValidationError(f"{label('refiner_switch')}: this server has no refiner "
                              "(start it with --refiner)", field=label("refiner_switch"))
    if "init_image" in v:
        raise ValidationError(f"{label('refiner_switch')}: the refiner hand-off is for "
                              "text-to-image; not with an init image",
                              field=label("refiner_switch"))


_SIZE_HINT = "; send width and height to resize the init image"


def _cannot(field: str, what: str) -> ValidationError:
    return ValidationError(f"{field}: the model served here does not take {what}; see "
                           "image_inputs in /v1/info", field=field)


def _check_image_fields(v: dict[str, Any], steps: int, limits: Limits,
                        label: Callable[[str], str]) -> None:
    """What can be judged of the image fields without decoding an image."""
    if "init_image" not in v:
        for name in ("mask_image", *_IMAGE_ONLY):
            if name in v:
                raise ValidationError(f"{label(name)} needs an {label('init_image')}",
                                      field=label(name))
        return
    if IMG2IMG not in limits.image_inputs:
        raise _cannot(label("init_image"), "an init image (img2img)")
    if "mask_image" in v and INPAINT not in limits.image_inputs:
        raise _cannot(label("mask_image"), "inpainting (a mask)")
    strength = v.get("strength", 0.75)
    if int(steps * strength) < 1:
        raise ValidationError(
            f"{label('strength')} {strength:g} of {steps} steps runs no denoising step "
            f"(int(steps * strength) = 0); raise {label('strength')} or the steps",
            field=label("strength"))


def image_size(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """The size an init image of width x height gives a request that names none: its own,
    rounded down to what the model takes (`Limits.size_multiple`)."""
    step = limits.size_multiple
    return width - width % step, height - height % step


def _check_area(width: int, height: int, steps: int, limits: Limits,
                label: Callable[[str], str], *, derived: bool) -> None:
    """The rules across fields: pixels, and pixels x steps. `derived`: a side came from the
    init image, so the error names it."""
    if width * height > limits.max_pixels:
        raise ValidationError(
            f"width*height = {width * height} exceeds the limit of {limits.max_pixels} pixels"
            + (_SIZE_HINT if derived else ""),
            field=label("init_image" if derived else "width"),
        )
    cost = width * height * steps
    if limits.max_cost and cost > limits.max_cost:
        raise ValidationError(
            f"width*height*inference_steps = {cost} exceeds this server's cost limit of "
            f"{limits.max_cost}; ask for fewer steps or fewer pixels",
            field=label("inference_steps"),
        )


def _size_of(v: dict[str, Any], decoded: images.Decoded, limits: Limits,
             label: Callable[[str], str]) -> tuple[int, int]:
    """The size of a request with an init image and at most one of width and height: each
    missing side is the image's, rounded down, and checked here like a sent one."""
    own = image_size(*decoded.image.size, limits)
    width, height = v.get("width", own[0]), v.get("height", own[1])
    field = label("init_image")
    for side, name in ((width, "width"), (height, "height")):
        if name not in v:
            low, high = _bound(FIELDS[name].lo, limits), _bound(FIELDS[name].hi, limits)
            if (low is not None and side < low) or (high is not None and side > high):
                raise ValidationError(
                    f"{field} is {decoded.image.width}x{decoded.image.height}: its {name} "
                    f"{side} (rounded down to a multiple of {limits.size_multiple}) is out of "
                    f"{_num(low)}..{_num(high)}" + _SIZE_HINT, field=field)
    return width, height


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
