# img2img and inpainting through the AUTOMATIC1111 API with PyPI's webuiapi client
# (pip install webuiapi): variation.png, then inpainted.png. Inpainting here is A1111's "whole
# picture" with masked content "original": send inpainting_fill=1 and inpaint_full_res=False.
import os

import webuiapi
from PIL import Image, ImageDraw

url = os.environ.get("BATCHSERVE_URL", "http://127.0.0.1:8000")
api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=20)

photo = Image.new("RGB", (512, 512), (120, 160, 200))  # stands in for your photo
varied = api.img2img(images=[photo], prompt="a harbour at dawn", denoising_strength=0.5,
                     width=512, height=512, seed=5)
varied.image.save("variation.png")

mask = Image.new("L", photo.size, 0)
ImageDraw.Draw(mask).rectangle((192, 192, 320, 320), fill=255)  # white: repainted
inpainted = api.img2img(images=[photo], mask_image=mask, prompt="a red boat",
                        inpainting_fill=1, inpaint_full_res=False, mask_blur=4,
                        denoising_strength=0.9, width=512, height=512, seed=6)
inpainted.image.save("inpainted.png")
