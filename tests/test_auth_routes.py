"""Issue 18 item 8: with `--api-key`, which routes need the key, route by route (the table in
docs/guides/operating.md, "API key")."""

from __future__ import annotations

import pytest
from inprocess import in_process

KEY = "s3cret-key"
OPEN = ["/", "/docs", "/openapi.json", "/v1/info", "/healthz", "/readyz"]
KEYED_GETS = ["/v1/jobs/job_aaaaaaaaaaaaaaaaaaaaaa", "/sdapi/v1/sd-models"]


@pytest.mark.parametrize("path", OPEN)
async def test_open_routes_answer_without_the_key(path: str) -> None:
    async with in_process(api_key=KEY) as app:
        response = await app.client.get(path)
        assert response.status_code == 200, (path, response.text)
        assert KEY not in response.text  # never echoed, in the page, the spec or the info


@pytest.mark.parametrize("path", KEYED_GETS)
async def test_user_routes_need_the_key(path: str) -> None:
    async with in_process(api_key=KEY) as app:
        refused = await app.client.get(path)
        assert refused.status_code == 401, (path, refused.text)
        allowed = await app.client.get(path, headers={"authorization": f"Bearer {KEY}"})
        assert allowed.status_code != 401, (path, allowed.text)


async def test_generation_needs_the_key() -> None:
    async with in_process(api_key=KEY) as app:
        for path in ("/t2i", "/v1/jobs", "/v1/images/generations"):
            response = await app.client.post(path, json={"prompt": "a cube"})
            assert response.status_code == 401, (path, response.text)


@pytest.mark.parametrize("protect", [False, True])
async def test_metrics_need_the_key_only_with_protect_metrics(protect: bool) -> None:
    async with in_process(api_key=KEY, protect_metrics=protect) as app:
        response = await app.client.get("/metrics")
        assert response.status_code == (401 if protect else 200)
        keyed = await app.client.get("/metrics", headers={"authorization": f"Bearer {KEY}"})
        assert keyed.status_code == 200
