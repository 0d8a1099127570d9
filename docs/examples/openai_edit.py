# An edit through the OpenAI images API with OpenAI's own client (pip install openai): the
# mask's fully transparent pixels mark what to repaint, as OpenAI's masks do (edit.png).
import base64
import io
import os

from openai import OpenAI
from PIL import Image, ImageDraw

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("BATCHSERVE_API_KEY", "none"))


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


photo = Image.new("RGB", (512, 512), (200, 190, 170))  # stands in for your photo
mask = Image.new("RGBA", photo.size, (0, 0, 0, 255))  # opaque: kept
ImageDraw.Draw(mask).rectangle((128, 128, 384, 384), fill=(0, 0, 0, 0))  # transparent: edited
result = client.images.edit(
    image=("photo.png", png(photo), "image/png"), mask=("mask.png", png(mask), "image/png"),
    prompt="a vase of sunflowers on the table", size="512x512",
    extra_body={"strength": 0.8, "seed": 4, "num_inference_steps": 20},
)
with open("edit.png", "wb") as out:
    out.write(base64.b64decode(result.data[0].b64_json or ""))
