# serve: --model sim --api-keys docs/examples/tenants.toml
# Two tenants from one file: alice generates; bob, allowed one image a minute, is told when
# to come back (429 rate_limited with Retry-After) on his second request.
import os

import httpx

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
body = {"prompt": "a lighthouse at dusk", "width": 128, "height": 128}

with httpx.Client(base_url=url, timeout=60) as client:
    alice = client.post("/t2i", json=body,
                        headers={"Authorization": "Bearer sk-alice-example-0001"})
    alice.raise_for_status()
    with open("lighthouse.png", "wb") as f:
        f.write(alice.content)

    bob = {"Authorization": "Bearer sk-bob-example-0002"}
    assert client.post("/t2i", json=body, headers=bob).status_code == 200
    again = client.post("/t2i", json=body, headers=bob)
    error = again.json()["error"]
    print(again.status_code, error["code"], "retry after", again.headers["Retry-After"], "s")
    assert again.status_code == 429 and error["code"] == "rate_limited"
