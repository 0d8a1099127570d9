"""Bodies that may carry images, read within their limits while they stream in.

A JSON body is held to `--max-body-bytes` unless it carries an image, then to
`--max-image-bytes`: the doors that take images stream up to the larger limit and answer 413 when
a body past the smaller one turns out to carry none (so text-only requests keep today's limit).
A multipart body (OpenAI's edits) is held to `--max-image-bytes` as it streams, with few parts
and bounded fields, and parsed by Starlette's parser (python-multipart).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable

import orjson
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from ..errors import BodyTooLarge, MalformedForm, UnsupportedMediaType

MAX_FORM_FIELDS = 40
MAX_FORM_FILES = 4  # an image and a mask, and room to say "one image" to a client sending more


def _declared_over(request: Request, limit: int) -> bool:
    declared = request.headers.get("content-length")
    return bool(declared and declared.isdigit() and int(declared) > limit)


async def limited(request: Request, limit: int, too_large: BodyTooLarge
                  ) -> AsyncGenerator[bytes, None]:
    """The body's chunks, raising `too_large` as soon as they pass `limit` bytes (or at once when
    the declared Content-Length does); Starlette's `ClientDisconnect` when the client leaves
    mid-body (the gateway answers that)."""
    if _declared_over(request, limit):
        raise too_large
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        yield chunk


async def read(request: Request, limit: int, too_large: BodyTooLarge) -> bytes:
    return b"".join([chunk async for chunk in limited(request, limit, too_large)])


def carries_image(body: bytes, fields: Iterable[str]) -> bool:
    """Whether a JSON body has a non-empty value in one of the image `fields`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and any(data.get(name) for name in fields)


async def read_json(request: Request, *, text_limit: int, image_limit: int,
                    image_fields: tuple[str, ...]) -> bytes:
    """The JSON body: within `text_limit`, or within `image_limit` when it carries an image."""
    limit = image_limit if image_fields else text_limit
    body = await read(request, limit, BodyTooLarge(
        f"request body exceeds {limit} bytes"
        + (" (--max-image-bytes, for a body that carries an image)" if image_fields else "")))
    if len(body) > text_limit and not carries_image(body, image_fields):
        raise BodyTooLarge(f"request body exceeds {text_limit} bytes; only a body that carries "
                           f"an image ({', '.join(image_fields)}) may reach {image_limit}")
    return body


async def read_form(request: Request, limit: int) -> FormData:
    """A `multipart/form-data` body within `limit` bytes, with at most `MAX_FORM_FIELDS` text
    fields and `MAX_FORM_FILES` files. The caller closes it (`await form.close()`)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            f"Content-Type must be multipart/form-data, got {media or 'none'}")
    stream = limited(request, limit, BodyTooLarge(
        f"request body exceeds {limit} bytes (--max-image-bytes)"))
    parser = MultiPartParser(request.headers, stream, max_files=MAX_FORM_FILES,
                             max_fields=MAX_FORM_FIELDS, max_part_size=limit)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise MalformedForm(f"malformed multipart body: {exc.message}") from None


async def form_bytes(value: str | UploadFile) -> str | bytes:
    """A form value as an image field takes it: an uploaded file's bytes, or a text value
    (base64) as it is."""
    return value if isinstance(value, str) else await value.read()
