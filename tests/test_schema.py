"""Request validation against the HTTP contract, one table of good and bad bodies."""

from __future__ import annotations

import dataclasses
from typing import Any

import jsonschema
import orjson
import pytest
from PIL import Image

from batchserve import images
from batchserve.engines.capabilities import ALL_IMAGE_INPUTS, IMG2IMG
from batchserve.errors import MalformedJSON, ValidationError
from batchserve.images import MaskRule
from batchserve.schema import (
    FIELDS,
    MAX_SEED,
    Limits,
    T2IRequest,
    image_size,
    parse,
    repeat,
    request_schema,
    validate,
)

from imagedata import b64, encode, gradient, mask, png

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
    (body(), {"sampler": "dpm++2m-karras"}),
    (body(sampler="euler-a"), {"sampler": "euler-a"}),
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
    (body(sampler="Euler a"), "sampler"),
    (body(sampler=1), "sampler"),
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
    assert req.key == (256, 128, 4, 3.0, "dpm++2m-karras") == req.item().key
    assert parse(body(sampler="euler"), LIMITS).key[-1] == "euler"


def test_default_sampler_comes_from_limits() -> None:
    assert parse(body(), Limits(default_sampler="ddim")).sampler == "ddim"


def test_validate_names_the_doors_field_through_aliases() -> None:
    with pytest.raises(ValidationError) as caught:
        validate({"prompt": "x", "inference_steps": 0}, LIMITS, {"inference_steps": "steps"})
    assert caught.value.field == "steps" and caught.value.message.startswith("steps must be")


def test_repeat_numbers_seeds_and_count_keeps_them_in_range() -> None:
    req = validate({"prompt": "x", "seed": 5}, LIMITS, count=3)
    assert [r.seed for r in repeat(req, 3)] == [5, 6, 7]
    with pytest.raises(ValidationError) as caught:
        validate({"prompt": "x", "seed": MAX_SEED}, LIMITS, count=2)
    assert caught.value.field == "seed"
    for _ in range(20):
        assert validate({"prompt": "x"}, LIMITS, count=10).seed + 9 <= MAX_SEED


GOOD_FOR_SCHEMA = [orjson.loads(raw) for raw, _ in GOOD]
NOT_SCHEMA_RULES = {
    body(width=2048, height=2048),  # width*height: a rule across fields
    body(inference_steps=20, num_inference_steps=21),  # ditto
    body(width=512.0),  # JSON Schema counts 512.0 as an integer; we are stricter
}
BAD_FOR_SCHEMA = [orjson.loads(raw) for raw, field in BAD if field and raw not in NOT_SCHEMA_RULES]


def test_published_schema_accepts_and_rejects_what_the_validator_does() -> None:
    schema = request_schema(LIMITS)
    assert set(schema["properties"]) == set(FIELDS)
    for good in GOOD_FOR_SCHEMA:
        jsonschema.validate(good, schema)
    for bad in BAD_FOR_SCHEMA:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert schema["properties"]["inference_steps"]["maximum"] == LIMITS.max_steps


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


# -- images in: init_image, strength, mask_image, mask_blur -----------------------------------

IMAGES = Limits(image_inputs=ALL_IMAGE_INPUTS)


def edit(limits: Limits = IMAGES, **fields: Any) -> T2IRequest:
    return validate({"prompt": "x", **fields}, limits)


def refusal(limits: Limits = IMAGES, **fields: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        edit(limits, **fields)
    assert caught.value.status == 422
    return caught.value


def test_without_width_and_height_an_init_image_keeps_its_size_rounded_down() -> None:
    req = edit(init_image=b64(png(100, 75)))
    assert (req.width, req.height) == (96, 72) == image_size(100, 75, IMAGES)
    assert req.init is not None and (req.init.width, req.init.height) == (96, 72)
    assert req.init.strength == 0.75 and req.init.mask is None and len(req.init.rgb) == 96 * 72 * 3
    assert image_size(100, 75, dataclasses.replace(IMAGES, size_multiple=64)) == (64, 64)
    one_side = edit(init_image=b64(png(100, 75)), width=64)
    assert (one_side.width, one_side.height) == (64, 72)


def test_with_width_and_height_the_init_image_and_mask_are_stretched() -> None:
    req = edit(init_image=b64(png(100, 75)), width=64, height=128, strength=0.4, mask_blur=0,
               mask_image=b64(encode(mask(100, 75, (0, 0, 50, 75)))))
    assert req.init is not None and (req.width, req.height) == (64, 128)
    assert req.init.rgb == gradient(100, 75).resize((64, 128), Image.Resampling.LANCZOS).tobytes()
    assert req.init.mask is not None and len(req.init.mask) == 64 * 128
    assert req.item().init is req.init and req.init.strength == 0.4


def test_the_batching_key_carries_the_start_step() -> None:
    picture = b64(png(64, 64))
    text = edit(inference_steps=20, width=64, height=64)
    img2img = edit(init_image=picture, inference_steps=20, strength=0.75)
    full = edit(init_image=picture, inference_steps=20, strength=1.0)
    assert img2img.item().start_step == 5 and img2img.key == (*text.key, 5)
    assert img2img.key_label == "64x64x20x7.5@5/dpm++2m-karras"
    assert text.key_label == "64x64x20x7.5/dpm++2m-karras"
    assert full.item().start_step == 0 and full.key == text.key  # strength 1: from step 0


@pytest.mark.parametrize(("fields", "field", "says"), [
    ({"init_image": "!!"}, "init_image", "not valid base64"),
    ({"init_image": 5}, "init_image", "must be a base64 string"),
    ({"init_image": b64(b"GIF89a...")}, "init_image", "a GIF image"),
    ({"init_image": b64(png(40, 40))}, "init_image", "its width 40 (rounded down to a multiple "
     "of 8) is out of 64..2048; send width and height"),
    ({"init_image": b64(png(64, 2100))}, "init_image", "height 2096"),
    ({"init_image": b64(png(1100, 1000))}, "init_image", "exceeds the limit of 1048576 pixels; "
     "send width and height"),
    ({"init_image": b64(png(64, 64)), "width": 2048, "height": 2048}, "width", "exceeds"),
    ({"init_image": b64(png(64, 64)), "strength": 0}, "strength",
     "must be greater than 0 and at most 1"),
    ({"init_image": b64(png(64, 64)), "strength": 1.01}, "strength", "greater than 0"),
    ({"init_image": b64(png(64, 64)), "strength": -0.5}, "strength", "greater than 0"),
    ({"init_image": b64(png(64, 64)), "strength": "0.5"}, "strength", "must be a number"),
    ({"init_image": b64(png(64, 64)), "strength": 0.1, "inference_steps": 5}, "strength",
     "runs no denoising step"),
    ({"init_image": b64(png(64, 64)), "mask_blur": 65}, "mask_blur", "between 0 and 64"),
    ({"mask_image": b64(png(64, 64))}, "mask_image", "mask_image needs an init_image"),
    ({"strength": 0.5}, "strength", "strength needs an init_image"),
    ({"mask_blur": 2}, "mask_blur", "needs an init_image"),
    ({"init_image": b64(png(64, 64)), "mask_image": b64(png(64, 32))}, "mask_image",
     "mask_image is 64x32 but init_image is 64x64"),
])
def test_bad_image_fields_name_the_field(fields: dict[str, Any], field: str, says: str) -> None:
    error = refusal(**fields)
    assert error.field == field and says in error.message, error.message


def test_a_model_that_cannot_take_images_refuses_them_before_decoding() -> None:
    bomb = b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)  # never opened: refused before
    error = refusal(Limits(), init_image=bomb)
    assert error.field == "init_image" and "does not take an init image" in error.message
    img2img_only = Limits(image_inputs=frozenset({IMG2IMG}))
    assert edit(img2img_only, init_image=b64(png(64, 64))).init is not None
    error = refusal(img2img_only, init_image=b64(png(64, 64)), mask_image=bomb)
    assert error.field == "mask_image" and "does not take inpainting" in error.message


def test_an_oversized_init_image_is_refused_by_the_limit_from_limits() -> None:
    error = refusal(dataclasses.replace(IMAGES, max_input_pixels=64 * 64),
                    init_image=b64(png(80, 64)), width=64, height=64)
    assert error.field == "init_image" and "at most 4096 pixels" in error.message


def test_door_names_reach_image_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        validate({"prompt": "x", "init_image": b64(png(64, 64)), "mask_image": "??"}, IMAGES,
                 {"init_image": "image", "mask_image": "mask"}, masks=MaskRule.TRANSPARENT)
    assert caught.value.field == "mask" and caught.value.message.startswith("mask is not")


def test_fields_describe_an_edit_without_pixels_and_rebuild_it_with_them() -> None:
    req = edit(init_image=b64(png(64, 72)), mask_image=b64(encode(mask(64, 72, (0, 0, 9, 9)))),
               strength=0.5, mask_blur=2, seed=9)
    fields = req.fields()
    assert fields["init_image"] == {"width": 64, "height": 72} == fields["mask_image"]
    assert (fields["strength"], fields["mask_blur"]) == (0.5, 2)
    assert len(orjson.dumps(fields)) < 1000  # a job record never holds the pixels
    pixels = req.pixels()
    assert pixels is not None and len(pixels) == 64 * 72 * 4
    assert T2IRequest.from_fields(fields, pixels) == dataclasses.replace(req, timeout_given=False)
    with pytest.raises(ValueError, match="missing or torn"):
        T2IRequest.from_fields(fields, pixels[:-1])
    with pytest.raises(ValueError, match="missing or torn"):
        T2IRequest.from_fields(fields, None)
    text = edit(seed=3)
    assert text.pixels() is None and T2IRequest.from_fields(text.fields()) == text


def test_published_schema_documents_the_image_fields() -> None:
    props = request_schema(IMAGES)["properties"]
    assert props["init_image"]["type"] == "string"
    assert props["init_image"]["contentEncoding"] == "base64"
    assert props["strength"]["exclusiveMinimum"] == 0 and props["strength"]["maximum"] == 1
    assert props["mask_blur"]["default"] == 4 and props["width"]["multipleOf"] == 8
    jsonschema.validate({"prompt": "x", "init_image": "aGk=", "strength": 1}, request_schema(
        IMAGES))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"prompt": "x", "strength": 0}, request_schema(IMAGES))


def test_cheap_checks_refuse_before_the_image_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("decoded an image for a request refused anyway")

    monkeypatch.setattr(images, "decode", never)
    picture = b64(png(64, 64))
    for fields, field in (({"width": 2048, "height": 2048}, "width"),
                          ({"inference_steps": 151}, "inference_steps"),
                          ({"strength": 2}, "strength"), ({"seed": -1}, "seed"),
                          ({"inference_steps": 2, "strength": 0.2}, "strength")):
        assert refusal(init_image=picture, **fields).field == field
