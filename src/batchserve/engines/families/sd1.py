"""Stable Diffusion 1.x and 2.x (`StableDiffusionPipeline`): one CLIP text encoder whose hidden
states are the whole conditioning."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..lora.rows import Choice
from ..prompts import PromptEncoder
from ..protocol import GenerationItem
from .base import FAMILY_SIZES, Row


class SD1:
    name = "sd1"
    sizes = FAMILY_SIZES["sd1"]
    upcast_vae = False
    pipeline_class = "StableDiffusionPipeline"

    def __init__(self, prompts: PromptEncoder) -> None:
        self.prompts = prompts

    @property
    def encoders(self) -> Sequence[PromptEncoder]:
        return (self.prompts,)

    def rows(self, item: GenerationItem, *, guided: bool, lora: Choice = ()) -> list[Row]:
        """Encoded alone by the engine's one `PromptEncoder` (long prompts, clip skip,
        embeddings, per-request LoRA as in a whole batch); padding across items happens per
        step."""
        text = self.prompts.encode([item.prompt], [item.negative_prompt], guidance=guided,
                                   loras=[lora] if lora else None)
        mask = text.attention_mask  # [2, L] negatives first, or [1, L]; None when unpadded
        if text.negative_embeds is None:
            return [Row(text.prompt_embeds, None if mask is None else mask[0])]
        return [Row(text.negative_embeds, None if mask is None else mask[0]),
                Row(text.prompt_embeds, None if mask is None else mask[1])]

    @contextmanager
    def conditioning(self, items: Sequence[GenerationItem],
                     loras: Sequence[Choice] | None = None) -> Iterator[dict[str, Any]]:
        with self.prompts.conditioning(items, loras) as text:
            yield {"prompt_embeds": text.prompt_embeds,
                   "negative_prompt_embeds": text.negative_embeds}
