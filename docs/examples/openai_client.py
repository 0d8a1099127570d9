# Two images through the OpenAI images API, with OpenAI's own Python client (pip install openai).
import base64
import os

from openai import OpenAI

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
# The client wants a key: the server's --api-key when it has one, else anything.
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("BATCHSERVE_API_KEY", "none"))
result = client.images.generate(
    prompt="a red cube", n=2, size="128x128",
    extra_body={"seed": 1, "num_inference_steps": 20, "negative_prompt": "blurry"},
)
for i, image in enumerate(result.data):
    with open(f"cube-{i}.png", "wb") as out:
        out.write(base64.b64decode(image.b64_json or ""))
