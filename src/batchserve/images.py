"""Untrusted images in: the one place that turns what a client sent as `init_image` and
`mask_image` (base64, a `data:` URL, or the raw bytes of a multipart upload) into the pixels an
engine item carries (`engines.ImageInput`). No torch here; every door reaches it through
`schema.validate`.

What it guarantees, in order:
- only base64 (or a `data:...;base64,` URL) is read; a remote URL is refused, never fetched;
- the format is sniffed from the bytes and only PNG, JPEG and WebP are opened, each with its own
  Pillow plugin alone (`Image.open(..., formats=[...])`): no other decoder ever sees the bytes;
- the dimensions come from the header and are checked against `--max-input-pixels` BEFORE any
  pixel is decoded, so a small file claiming a huge image (a decompression bomb) allocates
  nothing; Pillow's own bomb guard and truncated or corrupt files are refused the same way;
- EXIF orientation is applied; any mode becomes RGB (alpha flattened onto white, as A1111
  does) and masks become L (white: repaint);
- the image and its mask are stretched to the item's size (A1111's `resize_mode` 0, "just
  resize", Lanczos as A1111 and diffusers resize) and the mask is blurred in output pixels.

Every failure is a `ValidationError` naming the door's own field (the caller passes the label).
"""

from __future__ import annotations

import base64
import binascii
import enum
import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import cast

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .engines.protocol import ImageInput
from .errors import ValidationError

OPENED = ("PNG", "JPEG", "WEBP")
"""The only Pillow plugins that ever see a client's bytes."""
_WHITE = (255, 255, 255)
_DATA_URL = re.compile(r"data:[\w.+/-]*(?:;[\w.+=-]+)*?;base64,", re.IGNORECASE)
_REMOTE = re.compile(r"\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# Formats people send by mistake, so the refusal can say what it saw.
_OTHER_MAGIC = ((b"GIF87a", "a GIF image"), (b"GIF89a", "a GIF image"), (b"BM", "a BMP image"),
                (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
                (b"\x00\x00\x01\x00", "an ICO image"), (b"8BPS", "a Photoshop file"),
                (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"), (b"%PDF", "a PDF document"))
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Pillow errors that mean "not a readable image": a header that lies, a truncated body, a bomb.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  struct.error, zlib.error, MemoryError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


class MaskRule(enum.Enum):
    """How a door's mask marks what to repaint."""

    WHITE = "white"
    """batchserve's and A1111's: white is repainted, black kept (luminance); a mask with
    transparency is read by its alpha, opaque = repaint, as A1111 reads a painted canvas."""
    BLACK = "black"
    """A1111's `inpainting_mask_invert` 1: the WHITE reading, inverted (black is repainted)."""
    TRANSPARENT = "transparent"
    """OpenAI's: the mask's transparent pixels mark the edit; without a mask, the image's own
    transparent pixels do (OpenAI's rule for an image with an alpha channel)."""


def image_bytes(value: str | bytes, label: str) -> bytes:
    """What a client sent as an image field, as bytes: raw bytes (a multipart upload) as they
    are; a string as base64, optionally behind a `data:<type>;base64,` prefix. Whitespace (line
    wrapped base64) and missing `=` padding are tolerated."""
    if isinstance(value, bytes):
        data = value
    else:
        text = value
        if _REMOTE.match(text):
            raise ValidationError(f"{label} looks like a URL; images are not fetched, send the "
                                  "image itself as base64", field=label)
        text = text.strip()
        if text[:5].lower() == "data:":
            prefix = _DATA_URL.match(text)
            if prefix is None:
                raise ValidationError(f"{label} is a data: URL that is not base64; send "
                                      "data:image/png;base64,...", field=label)
            text = text[prefix.end():]
        compact = "".join(text.split())
        compact += "=" * (-len(compact) % 4)
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError(f"{label} is not valid base64", field=label) from None
    if not data:
        raise ValidationError(f"{label} is empty", field=label)
    return data


def sniff(data: bytes) -> str | None:
    """The Pillow format name of `data` from its first bytes, if it is one we open."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_format(data: bytes) -> str | None:
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    if data[4:12] in (b"ftypavif", b"ftypavis"):
        return "an AVIF image"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc"):
        return "a HEIC image"
    head = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<svg", b"<?xml", b"<!doctype svg")):
        return "an SVG image"
    return None


def open_image(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """The image in `data`, decoded and upright (EXIF orientation applied), in the mode it was
    stored in. Its size is checked from the header against `max_pixels` before the pixels are
    decoded."""
    fmt = sniff(data)
    if fmt is None:
        what = _other_format(data) or "not a PNG, JPEG or WebP image"
        raise ValidationError(f"{label} is {what}; send PNG, JPEG or WebP", field=label)
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large(label, None, max_pixels) from None
    except _DECODE_ERRORS as exc:
        raise _unreadable(label, fmt, exc) from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        image.close()
        raise _too_large(label, (width, height), max_pixels)
    try:
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when already upright
    except _DECODE_ERRORS as exc:
        image.close()
        raise _unreadable(label, fmt, exc) from None
    return image


def _too_large(label: str, size: tuple[int, int] | None, limit: int) -> ValidationError:
    claimed = f" ({size[0]}x{size[1]} = {size[0] * size[1]} pixels)" if size else ""
    return ValidationError(f"{label} is too large{claimed}; this server takes images of at most "
                           f"{limit} pixels (--max-input-pixels)", field=label)


def _unreadable(label: str, fmt: str, exc: BaseException) -> ValidationError:
    reason = str(exc) or type(exc).__name__
    return ValidationError(f"{label} is not a readable {fmt} image ({reason[:200]})", field=label)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _alpha(image: Image.Image) -> Image.Image:
    return image.convert("RGBA").getchannel("A")


def _see_through(alpha: Image.Image) -> bool:
    """Whether an alpha channel has any pixel that is not fully opaque."""
    low, _ = cast(tuple[int, int], alpha.getextrema())
    return low < 255


def _deep_to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale (16-bit PNGs) as 8-bit L: the top 8 bits, not clipped."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode as RGB; transparent pixels flattened onto white (A1111's default background)."""
    if image.mode.startswith("I"):
        image = _deep_to_8bit(image)
    if has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def to_mask(image: Image.Image, rule: MaskRule, label: str) -> Image.Image:
    """A mask image as L, 255 = repaint, by the door's rule."""
    if rule is MaskRule.TRANSPARENT:
        if not has_alpha(image) or not _see_through(_alpha(image)):
            raise ValidationError(f"{label} has no transparent pixels: its fully transparent "
                                  "pixels mark where to edit", field=label)
        return ImageOps.invert(_alpha(image))
    mask = _white_mask(image)
    return ImageOps.invert(mask) if rule is MaskRule.BLACK else mask


def _white_mask(image: Image.Image) -> Image.Image:
    if has_alpha(image):
        alpha = _alpha(image)
        if _see_through(alpha):  # a painted canvas: the strokes are the mask
            return alpha
    if image.mode.startswith("I"):
        return _deep_to_8bit(image)
    return image if image.mode == "L" else image.convert("L")


@dataclass(frozen=True, slots=True)
class Decoded:
    """A request's init image (RGB) and mask (L, 255 = repaint, the image's size), decoded and
    upright, before they are fitted to the item's size."""

    image: Image.Image
    mask: Image.Image | None


def decode(init: str | bytes, mask: str | bytes | None, *, max_pixels: int, rule: MaskRule,
           init_label: str, mask_label: str) -> Decoded:
    """Both images checked and decoded. A mask must have its image's size (after orientation):
    where a mask of another size should go cannot be known, so it is refused, not stretched."""
    image = open_image(image_bytes(init, init_label), init_label, max_pixels)
    if mask is not None:
        painted = open_image(image_bytes(mask, mask_label), mask_label, max_pixels)
        if painted.size != image.size:
            raise ValidationError(
                f"{mask_label} is {painted.width}x{painted.height} but {init_label} is "
                f"{image.width}x{image.height}; a mask must have its image's size",
                field=mask_label)
        return Decoded(to_rgb(image), to_mask(painted, rule, mask_label))
    if rule is MaskRule.TRANSPARENT and has_alpha(image):
        alpha = _alpha(image)
        if _see_through(alpha):
            return Decoded(to_rgb(image), ImageOps.invert(alpha))
    return Decoded(to_rgb(image), None)


def fit(decoded: Decoded, width: int, height: int, *, strength: float,
        mask_blur: int) -> ImageInput:
    """The engine's input: the image (and mask) stretched to width x height (A1111's
    `resize_mode` 0; no crop, no fill), the mask then blurred by `mask_blur` output pixels."""
    size = (width, height)
    image = _resized(decoded.image, size)
    mask = None
    if decoded.mask is not None:
        mask = _resized(decoded.mask, size)
        if mask_blur > 0:
            mask = mask.filter(ImageFilter.GaussianBlur(mask_blur))
    return ImageInput(width, height, image.tobytes(), strength,
                      mask.tobytes() if mask is not None else None, mask_blur)


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
