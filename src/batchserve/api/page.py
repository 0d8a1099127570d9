"""The web page at `/`, the API docs page at `/docs` and `/openapi.json`.

The pages are vendored static files in package data (no CDN, no build step); they talk to the
server only through its public API (`/v1/info`, `/t2i` or the jobs API), like any client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .common import Gateway, JSONResponse
from .openapi import PathsFor, build

STATIC = Path(__file__).with_name("static")
# The pages are plain files: a strict policy costs nothing and keeps injected script out.
_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
            "style-src 'self'; script-src 'self'; connect-src 'self'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class PageRoutes:
    def __init__(self, gateway: Gateway, extra_paths: list[PathsFor] | None = None) -> None:
        self.openapi: dict[str, Any] = build(gateway.service.limits, extra_paths)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_HEADERS)

    async def docs(self, request: Request) -> Response:
        return FileResponse(STATIC / "docs.html", headers=_HEADERS)

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self.openapi)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/docs", self.docs, methods=["GET"]),
            Route("/openapi.json", self.openapi_json, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
