"""Previews of images still being denoised: a linear projection of the latents to RGB, as the
web UIs draw their live previews (no VAE pass: a few thousand multiply-adds per latent pixel
instead of a decoder run). The image is the latent grid's size (1/8 of the output's side) and
only hints at the composition and colours; it is what a progress bar shows beside the percent.

The factors are the ones the community fitted per latent space (ComfyUI's `latent_rgb_factors`,
also used by A1111's "Approx cheap" preview): one 3-vector per latent channel, plus a bias for
SDXL. A family without factors (another latent space) gets no preview.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

# channel -> (R, G, B), and the bias added after the projection
LATENT_RGB: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "sd1": ((
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ), (0.0, 0.0, 0.0)),
    "sdxl": ((
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ), (0.1084, -0.0175, -0.0011)),
}
QUALITY = 70


def latent_preview(latents: torch.Tensor, family: str) -> bytes | None:
    """One item's latents [C, h, w] (or [1, C, h, w]) as a JPEG; None without factors for
    `family` or with another channel count (an inpainting UNet's extra channels are not in
    these latents: they are the noisy image's own four)."""
    table = LATENT_RGB.get(family)
    if latents.dim() == 4:
        latents = latents[0]
    if table is None or latents.shape[0] != len(table[0]):
        return None
    factors, bias = table
    with torch.inference_mode():
        weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)
        rgb = torch.einsum("chw,cr->hwr", latents.float(), weight)
        rgb = rgb + torch.tensor(bias, dtype=torch.float32, device=latents.device)
        pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "JPEG", quality=QUALITY)
    return out.getvalue()
