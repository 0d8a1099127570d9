from __future__ import annotations

import io

import pytest
from PIL import Image

from batchserve.encode import MEDIA_TYPES, encode, negotiate


@pytest.mark.parametrize(("requested", "accept", "expected"), [
    (None, None, "png"),
    (None, "*/*", "png"),
    (None, "image/webp", "webp"),
    (None, "text/html, image/jpeg;q=0.9", "jpeg"),
    (None, "image/webp;q=0.5, image/jpeg;q=0.8", "jpeg"),
    (None, "image/webp;q=0", "png"),
    ("png", "image/webp", "png"),
])
def test_negotiate(requested: str | None, accept: str | None, expected: str) -> None:
    assert negotiate(requested, accept) == expected


@pytest.mark.parametrize("fmt", sorted(MEDIA_TYPES))
def test_encode_round_trips(fmt: str) -> None:
    data = encode(Image.new("RGB", (24, 16), (200, 10, 10)), fmt)
    image = Image.open(io.BytesIO(data))
    assert image.size == (24, 16)
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
