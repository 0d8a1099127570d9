# Inpainting through POST /t2i with httpx and Pillow: repaint the white part of a mask, keep
# the black (balloon.png, the picture's size).
import base64
import io
import os

import httpx
from PIL import Image, ImageDraw

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")


def b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


picture = Image.new("RGB", (512, 384), (90, 150, 210))  # stands in for your photo
ImageDraw.Draw(picture).rectangle((0, 260, 512, 384), fill=(60, 140, 60))
mask = Image.new("L", picture.size, 0)  # black: kept
ImageDraw.Draw(mask).ellipse((176, 60, 336, 240), fill=255)  # white: repainted
reply = httpx.post(f"{url}/t2i", timeout=300, json={
    "prompt": "a hot air balloon in the sky", "init_image": b64(picture),
    "mask_image": b64(mask), "strength": 0.9, "mask_blur": 8, "seed": 3,
})
reply.raise_for_status()
with open("balloon.png", "wb") as out:
    out.write(reply.content)
