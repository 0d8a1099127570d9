"""Image encoding (PNG/JPEG/WebP) and format negotiation. Called from a thread pool."""

from __future__ import annotations

import io

from PIL.Image import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_BY_MEDIA = {v: k for k, v in MEDIA_TYPES.items()} | {"image/jpg": "jpeg"}


def negotiate(requested: str | None, accept: str | None) -> str:
    """The body's `format` wins; else the image type `Accept` prefers (by q) that we make;
    else PNG."""
    if requested:
        return requested
    offers = []
    for order, part in enumerate((accept or "").split(",")):
        media, *params = (p.strip().lower() for p in part.split(";"))
        if media in _BY_MEDIA:
            offers.append((-_quality(params), order, _BY_MEDIA[media]))
    best = min(offers, default=None)
    return best[2] if best and best[0] < 0 else "png"


def _quality(params: list[str]) -> float:
    for param in params:
        if param.startswith("q="):
            try:
                return float(param[2:])
            except ValueError:
                return 0.0
    return 1.0


def encode(image: Image, fmt: str, *, png_compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG", compress_level=png_compress_level)
    elif fmt == "jpeg":
        image.convert("RGB").save(buf, format="JPEG", quality=90)
    elif fmt == "webp":
        image.save(buf, format="WEBP", quality=90, method=2)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()
