# Two images through the AUTOMATIC1111 API with the webuiapi client (pip install webuiapi),
# as bots and front ends that speak A1111 do.
import os

import webuiapi

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=20)
result = api.txt2img(prompt="a red cube", seed=1, width=128, height=128, batch_size=2)
for i, image in enumerate(result.images):
    image.save(f"cube-{i}.png")
print(result.info["all_seeds"])
