"""Model families: what differs between architectures (text encoders, conditioning, sizes) in one
module per family, behind the one step core (`engines.stepwise`) and the one whole-batch engine
(`engines.diffusion`). `detect` tells a `--model`'s family without torch; `base` is the
`Family` protocol both engines call; `sd1` and `sdxl` implement it; `generic` is what is known
without torch of any other diffusers pipeline, which `engines.generic` runs whole."""

from __future__ import annotations

from .base import FAMILY_SIZES, Sizes
from .detect import (
    FAMILIES,
    PRESET_FAMILIES,
    check_refiner,
    check_start,
    detect,
    resolve,
    served_family,
    served_samplers,
    served_sizes,
)

__all__ = ["FAMILIES", "FAMILY_SIZES", "PRESET_FAMILIES", "Sizes", "check_refiner",
           "check_start", "detect", "resolve",
           "served_family", "served_samplers", "served_sizes"]
