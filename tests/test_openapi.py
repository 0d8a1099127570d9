"""`/openapi.json` is valid OpenAPI 3.1, describes every route the app serves, and states the
limits the validator enforces; `/docs` and `/` are served from package files."""

from __future__ import annotations

from typing import Any

import jsonschema
from inprocess import in_process
from openapi_spec_validator import validate
from starlette.routing import Mount, Route

from batchserve.schema import FIELDS


async def spec_of(**settings: Any) -> dict[str, Any]:
    async with in_process(**settings) as app:
        response = await app.client.get("/openapi.json")
        assert response.status_code == 200
        data: dict[str, Any] = response.json()
        served = {(r.path, m.lower()) for r in app.app.routes if isinstance(r, Route)
                  for m in (r.methods or ()) if m != "HEAD"}
        documented = {(p, m) for p, ops in data["paths"].items() for m in ops}
        assert served == documented  # every route, and nothing that is not served
        assert any(isinstance(r, Mount) for r in app.app.routes)  # /static
        return data


async def test_openapi_document_is_valid_and_covers_every_route() -> None:
    validate(await spec_of())


async def test_openapi_states_the_servers_own_limits() -> None:
    spec = await spec_of(max_steps=33)
    t2i = spec["components"]["schemas"]["T2IRequest"]
    assert set(t2i["properties"]) == set(FIELDS)
    assert t2i["properties"]["inference_steps"]["maximum"] == 33
    openai_body = spec["paths"]["/v1/images/generations"]["post"]["requestBody"]
    props = openai_body["content"]["application/json"]["schema"]["properties"]
    assert props["num_inference_steps"]["maximum"] == 33 and props["n"]["maximum"] == 10
    a1111 = spec["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]
    steps = a1111["content"]["application/json"]["schema"]["properties"]["steps"]
    assert steps["maximum"] == 33
    # the published schema rejects what the validator rejects
    try:
        jsonschema.validate({"prompt": "x", "inference_steps": 34}, t2i)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("schema accepted steps over --max-steps")


async def test_pages_and_static_files_are_served_without_a_cdn() -> None:
    async with in_process() as app:
        for path in ("/", "/docs"):
            page = await app.client.get(path)
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "http://" not in page.text and "https://" not in page.text  # nothing remote
            assert "default-src 'self'" in page.headers["content-security-policy"]
        for name in ("app.js", "docs.js", "style.css", "docs.css"):
            asset = await app.client.get(f"/static/{name}")
            assert asset.status_code == 200 and "https://" not in asset.text
        missing = await app.client.get("/static/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
