# Follow a job as it generates: its Server-Sent Events (pip install httpx httpx-sse) print the
# queue position, each step's percent, and save the last preview (preview.jpg, a cheap picture
# of the latents) and the image (final.png).
import base64
import json
import os

import httpx
from httpx_sse import connect_sse

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=90)) as client:
    job = client.post("/v1/jobs", json={"prompt": "a lighthouse at dusk", "seed": 7,
                                        "width": 256, "height": 256,
                                        "inference_steps": 10}).json()
    with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as events:
        for event in events.iter_sse():
            data = json.loads(event.data)
            if event.event == "queued":
                print("queued, position", data["position"])
            elif event.event == "progress":
                print(f"step {data['step']}/{data['steps']} ({data['fraction']:.0%})")
                if "preview" in data:
                    jpeg = base64.b64decode(data["preview"].partition(",")[2])
                    with open("preview.jpg", "wb") as f:
                        f.write(jpeg)
            elif event.event == "started":
                print("started")
            else:  # succeeded, failed or canceled: the job's view, and the end
                print(event.event)
                break
    assert data["status"] == "succeeded", data
    with open("final.png", "wb") as f:
        f.write(client.get(f"/v1/jobs/{job['id']}/image").content)
