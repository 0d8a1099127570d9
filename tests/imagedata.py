"""Images for the tests of images in: encoded by Pillow, or crafted byte by byte where a test
needs a file that lies (a PNG header claiming a huge image over a tiny body)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def gradient(width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A picture whose every pixel differs from its neighbours, so a resize or a rotation shows."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1),
                    (x * 7 + y * 13) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def noise(width: int, height: int) -> Image.Image:
    """Random-looking RGB that PNG cannot shrink much: for tests about body sizes."""
    return Image.merge("RGB", [Image.effect_noise((width, height), 64 + 8 * i) for i in range(3)])


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    return encode(gradient(width, height, mode))


def mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """Black with a white rectangle (left, top, right, bottom): white is repainted."""
    out = Image.new("L", (width, height), 0)
    out.paste(255, box)
    return out


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def lying_png(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming width x height RGB, over a few bytes of data: a
    decompression bomb's shape (decoding it would allocate width * height * 3 bytes)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + _chunk(b"IEND", b""))


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())
