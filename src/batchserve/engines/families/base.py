"""The `Family` protocol: what the step core and the whole-batch engine ask of a model family."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch

    from ..lora.rows import Choice
    from ..prompts import PromptEncoder
    from ..protocol import GenerationItem


class Row(NamedTuple):
    """One UNet row of one item: its cross-attention conditioning [1, L, D], its padding mask
    [L] (None: no padding) and the family's extra UNet inputs for the row (SDXL: the pooled
    text embedding [1, P] and the micro-conditioning time ids [1, 6]), which the step core
    concatenates across rows into `added_cond_kwargs`."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    added: Mapping[str, torch.Tensor] | None = None


@dataclass(frozen=True, slots=True)
class Sizes:
    """The image sizes a family is made for: its default, the sizes the page offers, and the
    rule every size must meet (a multiple of the VAE's scale factor)."""

    default: tuple[int, int]
    presets: tuple[tuple[int, int], ...]
    multiple_of: int = 8

    def warmup(self, steps: int = 2) -> list[tuple[int, int, int]]:
        """`--warmup auto`: the default size and half of it (on the size grid), the shapes a
        first request most likely has and a smaller one."""
        w, h = self.default
        m = self.multiple_of
        half = (max(m, w // 2 // m * m), max(m, h // 2 // m * m))
        return [(*half, steps), (w, h, steps)]

    def to_dict(self, max_pixels: int) -> dict[str, Any]:
        return {
            "default": _label(self.default),
            "presets": [_label(s) for s in self.presets if s[0] * s[1] <= max_pixels],
            "multiple_of": self.multiple_of,
            "max_pixels": max_pixels,
        }


def _label(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


FAMILY_SIZES = {
    "sd1": Sizes(
        default=(512, 512),
        presets=((512, 512), (512, 768), (768, 512), (640, 640), (768, 768)),
    ),
    "sdxl": Sizes(
        default=(1024, 1024),
        # SDXL's training buckets near one megapixel (the sizes the web UIs offer).
        presets=((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
                 (768, 1344), (1536, 640), (640, 1536)),
    ),
    "generic": Sizes(
        default=(1024, 1024),
        # FLUX.1's and SD3's usual sizes near one megapixel: multiples of 16 (VAE 8 x patch 2).
        presets=((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
                 (768, 1344), (512, 512), (768, 768)),
        multiple_of=16,
    ),
}
"""Per family, no torch: a `--role api` process validates sizes without loading a model."""


def guided(unet: Any, item: GenerationItem) -> bool:
    """Classifier-free guidance is on: the pipelines' `do_classifier_free_guidance`."""
    return item.guidance_scale > 1 and unet.config.time_cond_proj_dim is None


class Family(Protocol):
    """One architecture's conditioning, for a loaded pipeline."""

    name: str
    sizes: Sizes
    upcast_vae: bool
    """Decode in float32 when an fp16 VAE's config says `force_upcast` (SDXL's pipeline does;
    SD 1.x's does not)."""

    @property
    def prompts(self) -> PromptEncoder:
        """The (first) text encoder's prompt encoder: its tokenizer is the one embeddings and
        long-prompt counting see."""
        ...

    @property
    def encoders(self) -> Sequence[PromptEncoder]:
        """Every text encoder's prompt encoder (per-request LoRA hooks each)."""
        ...

    def rows(self, item: GenerationItem, *, guided: bool, lora: Choice = ()) -> list[Row]:
        """The item's UNet rows, encoded alone: (negative, prompt) with classifier-free
        guidance, (prompt,) without, as the pipelines order them; `lora`: the item's
        per-request adapters, for its text encoders' part. Under `inference_mode`."""
        ...

    def conditioning(
        self, items: Sequence[GenerationItem], loras: Sequence[Choice] | None = None
    ) -> AbstractContextManager[dict[str, Any]]:
        """A whole batch's (one key's) conditioning as the pipeline's keyword arguments
        (`prompt_embeds` and the like), valid inside the block (which may hook the UNet);
        `loras`: each item's per-request adapters (text encoder part). Under
        `inference_mode`."""
        ...
