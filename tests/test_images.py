"""`images`: what a client sends as an image becomes pixels only through checks, and every
failure is a `ValidationError` naming the field. A file that lies about its size is refused
from its header, with no pixel buffer allocated (Pillow's own allocation counter says so)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageFilter

from batchserve import images
from batchserve.errors import ValidationError
from batchserve.images import MaskRule

from imagedata import b64, encode, gradient, jpeg_with_orientation, lying_png, mask, png

LIMIT = 4096 * 4096


def refused(call: Callable[[], object], field: str = "init_image") -> str:
    with pytest.raises(ValidationError) as caught:
        call()
    assert caught.value.field == field
    return caught.value.message


def allocated() -> int:
    """Image buffers Pillow has allocated in this process (`ImagingNew` calls)."""
    return int(Image.core.get_stats()["new_count"])


@pytest.fixture
def allocations() -> Iterator[Callable[[], int]]:
    """Image buffers Pillow allocated since the test started."""
    start = allocated()
    yield lambda: allocated() - start


# -- base64 and data: URLs -------------------------------------------------------------------


def test_base64_plain_wrapped_unpadded_and_data_urls_read_the_same_bytes() -> None:
    data = png(9, 7)
    text = b64(data)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # `base64` CLI output
    for sent in (text, wrapped, text.rstrip("="), f"data:image/png;base64,{text}",
                 f"DATA:image/jpeg;charset=utf-8;base64,{text}", f"  {text}\n", data):
        assert images.image_bytes(sent, "init_image") == data


@pytest.mark.parametrize(("sent", "says"), [
    ("not base64 at all!", "not valid base64"),
    ("////", "not a PNG, JPEG or WebP"),  # decodes to 3 bytes that are no image
    ("", "is empty"),
    ("data:image/png,rawtext", "data: URL that is not base64"),
    ("https://example.com/cat.png", "images are not fetched"),
    ("  file:///etc/passwd", "images are not fetched"),
])
def test_what_is_not_base64_of_an_image_is_refused_by_name(sent: str, says: str) -> None:
    def call() -> object:
        return images.open_image(images.image_bytes(sent, "init_image"), "init_image", LIMIT)

    assert says in refused(call)


# -- formats ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_open(fmt: str) -> None:
    opened = images.open_image(encode(gradient(20, 10), fmt), "init_image", LIMIT)
    assert opened.size == (20, 10)


@pytest.mark.parametrize(("data", "name"), [
    (encode(gradient(8, 8), "GIF"), "a GIF image"),
    (encode(gradient(8, 8), "BMP"), "a BMP image"),
    (encode(gradient(8, 8), "TIFF"), "a TIFF image"),
    (encode(gradient(16, 16), "ICO"), "an ICO image"),
    (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG image"),
    (b"<svg onload='alert(1)'></svg>", "an SVG image"),
    (b"%PDF-1.7\n", "a PDF document"),
    (b"\x00\x00\x00\x1cftypavif" + b"\x00" * 20, "an AVIF image"),
    (b"hello, world", "not a PNG, JPEG or WebP image"),
])
def test_other_formats_are_refused_before_any_decoder_sees_them(
    data: bytes, name: str, allocations: Callable[[], int]
) -> None:
    message = refused(lambda: images.open_image(data, "mask", LIMIT), "mask")
    assert f"mask is {name}; send PNG, JPEG or WebP" == message
    assert allocations() == 0


def test_a_gif_dressed_as_png_is_opened_by_the_png_plugin_only() -> None:
    # A PNG signature followed by a GIF: only PngImagePlugin is tried, and it refuses.
    forged = b"\x89PNG\r\n\x1a\n" + encode(gradient(8, 8), "GIF")
    assert "not a readable PNG image" in refused(
        lambda: images.open_image(forged, "init_image", LIMIT))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_and_corrupt_files_are_refused(fmt: str) -> None:
    whole = encode(gradient(64, 64), fmt)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    message = refused(lambda: images.open_image(whole[: len(whole) * 2 // 3], "init_image",
                                                LIMIT))
    assert f"not a readable {fmt} image" in message
    corrupt = whole[:40] + bytes(b ^ 0x5A for b in whole[40:])
    assert f"not a readable {fmt} image" in refused(
        lambda: images.open_image(corrupt, "init_image", LIMIT))


# -- sizes: checked from the header, before any pixel ------------------------------------------


def test_a_header_claiming_a_huge_image_is_refused_without_allocating(
    allocations: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[object] = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load",
                        lambda self: loads.append(self) or real_load(self))
    bomb = lying_png(5000, 5000)  # 75 MB of RGB claimed by 75 bytes; under Pillow's own guard
    assert len(bomb) < 100
    message = refused(lambda: images.open_image(bomb, "init_image", LIMIT))
    assert "5000x5000 = 25000000 pixels" in message and f"at most {LIMIT}" in message
    assert "--max-input-pixels" in message
    assert loads == [] and allocations() == 0


def test_pillows_own_decompression_bomb_guard_is_refused_the_same_way(
    allocations: Callable[[], int]
) -> None:
    bomb = lying_png(20000, 20000)  # 1.2 GB claimed: Pillow raises before we ask for the size
    message = refused(lambda: images.open_image(bomb, "mask_image", LIMIT), "mask_image")
    assert "too large" in message and "--max-input-pixels" in message
    assert allocations() == 0


def test_a_real_image_over_the_limit_is_refused_before_its_pixels_are_decoded() -> None:
    data = png(100, 100)
    before = allocated()
    refused(lambda: images.open_image(data, "init_image", 64 * 64))
    assert allocated() == before
    assert images.open_image(data, "init_image", 100 * 100).size == (100, 100)
    assert allocated() > before  # the counter does count a decode


# -- orientation and modes ---------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    picture = gradient(40, 20)
    upright = images.open_image(jpeg_with_orientation(picture, 6), "init_image", LIMIT)
    assert upright.size == (20, 40)  # orientation 6: rotate 90 degrees clockwise to view
    plain = images.open_image(jpeg_with_orientation(picture, 1), "init_image", LIMIT)
    expected = np.asarray(plain.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(upright, dtype=np.int16) - expected).max() <= 1


def test_transparency_is_flattened_onto_white_and_any_mode_becomes_rgb() -> None:
    rgba = Image.new("RGBA", (4, 2), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    rgb = images.to_rgb(images.open_image(encode(rgba), "init_image", LIMIT))
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 0)) == (10, 20, 30)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    flat = images.to_rgb(images.open_image(encode(palette, transparency=0), "x", LIMIT))
    assert [flat.getpixel((0, 0)), flat.getpixel((1, 0))] == [(255, 255, 255), (200, 100, 50)]
    deep = Image.new("I;16", (2, 1), 0x8040)
    assert images.to_rgb(images.open_image(encode(deep), "x", LIMIT)).getpixel((0, 0)) == (
        0x80, 0x80, 0x80)  # the top 8 bits, not clipped to white
    cmyk = images.to_rgb(images.open_image(encode(Image.new("CMYK", (2, 2), (0, 0, 0, 0)),
                                                  "JPEG"), "x", LIMIT))
    assert cmyk.mode == "RGB" and cmyk.getpixel((0, 0))[0] > 240


# -- masks -------------------------------------------------------------------------------------


def values(image: Image.Image, rule: MaskRule) -> list[object]:
    return list(images.to_mask(image, rule, "mask").get_flattened_data())


def test_mask_rules() -> None:
    grey = mask(4, 1, (1, 0, 2, 1))
    assert values(grey, MaskRule.WHITE) == [0, 255, 0, 0]
    assert values(grey, MaskRule.BLACK) == [255, 0, 255, 255]
    assert values(grey.convert("RGB"), MaskRule.WHITE) == [0, 255, 0, 0]
    canvas = Image.new("RGBA", (4, 1), (0, 0, 0, 0))  # a painted canvas: black strokes
    canvas.putpixel((2, 0), (0, 0, 0, 255))
    assert values(canvas, MaskRule.WHITE) == [0, 0, 255, 0]
    holes = Image.new("RGBA", (4, 1), (9, 9, 9, 255))  # OpenAI: transparent = edit
    holes.putpixel((3, 0), (9, 9, 9, 0))
    assert values(holes, MaskRule.TRANSPARENT) == [0, 0, 0, 255]


@pytest.mark.parametrize("opaque", [Image.new("RGB", (4, 4)), Image.new("RGBA", (4, 4))])
def test_an_openai_mask_without_transparent_pixels_is_refused(opaque: Image.Image) -> None:
    if opaque.mode == "RGBA":
        opaque.putalpha(255)
    message = refused(lambda: images.to_mask(opaque, MaskRule.TRANSPARENT, "mask"), "mask")
    assert "no transparent pixels" in message


def test_a_mask_of_another_size_is_refused() -> None:
    message = refused(lambda: images.decode(
        b64(png(64, 48)), b64(encode(mask(48, 64, (0, 0, 8, 8)))), max_pixels=LIMIT,
        rule=MaskRule.WHITE, init_label="init_image", mask_label="mask_image"), "mask_image")
    assert message == ("mask_image is 48x64 but init_image is 64x48; a mask must have its "
                       "image's size")


def test_an_openai_image_with_transparency_and_no_mask_edits_its_transparent_pixels() -> None:
    picture = gradient(8, 8).convert("RGBA")
    picture.putpixel((2, 3), (0, 0, 0, 0))
    decoded = images.decode(encode(picture), None, max_pixels=LIMIT,
                            rule=MaskRule.TRANSPARENT, init_label="image", mask_label="mask")
    assert decoded.mask is not None and decoded.mask.getpixel((2, 3)) == 255
    assert sum(1 for v in decoded.mask.get_flattened_data() if v) == 1
    plain = images.decode(encode(picture), None, max_pixels=LIMIT, rule=MaskRule.WHITE,
                          init_label="init_image", mask_label="mask_image")
    assert plain.mask is None  # our rule: no mask, no inpainting


# -- fitting to the item's size ----------------------------------------------------------------


def test_fit_stretches_to_the_size_and_blurs_the_mask_in_output_pixels() -> None:
    picture, painted = gradient(100, 60), mask(100, 60, (10, 10, 50, 40))
    decoded = images.decode(encode(picture), encode(painted), max_pixels=LIMIT,
                            rule=MaskRule.WHITE, init_label="init_image", mask_label="mask_image")
    fitted = images.fit(decoded, 64, 96, strength=0.5, mask_blur=3)
    assert (fitted.width, fitted.height, fitted.strength, fitted.mask_blur) == (64, 96, 0.5, 3)
    stretched = picture.resize((64, 96), Image.Resampling.LANCZOS)  # A1111's "just resize"
    assert fitted.rgb == stretched.tobytes()
    blurred = painted.resize((64, 96), Image.Resampling.LANCZOS).filter(
        ImageFilter.GaussianBlur(3))
    assert fitted.mask == blurred.tobytes() and len(fitted.mask) == 64 * 96
    same = images.fit(decoded, 100, 60, strength=1.0, mask_blur=0)
    assert same.rgb == picture.tobytes() and same.mask == painted.tobytes()  # no resampling
    assert "rgb" not in repr(same) and "mask=" not in repr(same)  # megabytes stay out of logs


def test_decoding_goes_through_the_restricted_open(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real_open = Image.open

    def spy(fp: object, mode: str = "r", formats: object = None) -> Image.Image:
        seen.append(formats)
        return real_open(fp, mode, formats)  # type: ignore[arg-type]

    monkeypatch.setattr(images.Image, "open", spy)
    images.decode(base64.b64encode(encode(gradient(8, 8), "WEBP")).decode(),
                  encode(mask(8, 8, (0, 0, 4, 4)), "JPEG"), max_pixels=LIMIT,
                  rule=MaskRule.WHITE, init_label="init_image", mask_label="mask_image")
    assert seen == [["WEBP"], ["JPEG"]]
