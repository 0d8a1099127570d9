"""The floor for serving overhead: a bare Starlette `POST /t2i` on the same uvicorn stack
(uvloop + httptools, no access log) that parses the JSON and returns a PNG encoded once.

    python -m uvicorn benchmarks.bare:app --loop uvloop --http httptools --no-access-log

`encoding_app` encodes the PNG on every request instead, as any image server must: the
difference between the two is what encoding alone costs.
"""

from __future__ import annotations

import io

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (127, 127, 127)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


_CACHE: dict[tuple[int, int], bytes] = {}


async def t2i(request: Request) -> Response:
    body = orjson.loads(await request.body())
    size = (int(body.get("width", 512)), int(body.get("height", 512)))
    png = _CACHE.get(size)
    if png is None:
        png = _CACHE[size] = _png(*size)
    return Response(png, media_type="image/png")


async def t2i_encoding(request: Request) -> Response:
    body = orjson.loads(await request.body())
    png = _png(int(body.get("width", 512)), int(body.get("height", 512)))
    return Response(png, media_type="image/png")


async def ready(_: Request) -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")


app = Starlette(routes=[Route("/t2i", t2i, methods=["POST"]), Route("/readyz", ready)])
encoding_app = Starlette(
    routes=[Route("/t2i", t2i_encoding, methods=["POST"]), Route("/readyz", ready)]
)
