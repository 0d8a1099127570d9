# serve: --lora-dir $EXAMPLE_DATA/loras
# A1111's LoRA prompt syntax through PyPI's webuiapi client (pip install webuiapi): the tag is
# removed from the prompt and the LoRA applied to this image only (lora.png).
import os

import webuiapi

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=20)
print([lora["name"] for lora in api.get_loras()])  # GET /sdapi/v1/loras
result = api.txt2img(prompt="a lighthouse at dusk <lora:ink:0.7>", seed=3)
result.image.save("lora.png")
