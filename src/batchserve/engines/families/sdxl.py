"""SDXL (`StableDiffusionXLPipeline`): two text encoders whose penultimate hidden states are
concatenated, the second one's pooled projection, and micro-conditioning (`add_time_ids`:
original size, crop top-left, target size) as extra UNet inputs.

Each item's rows carry their own pooled embedding and time ids, computed from the item alone as
diffusers' `encode_prompt` and `_get_add_time_ids` do for a batch of one: an item is conditioned
the same alone or among strangers, in a whole batch or joining a running one part-way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..lora.rows import Choice
from ..prompts import PromptEncoder, cross_attention_mask
from ..protocol import GenerationItem
from .base import FAMILY_SIZES, Row, guided


@dataclass(frozen=True, slots=True)
class Conditioning:
    """A batch's conditioning: both encoders' states side by side and the pooled output."""

    embeds: torch.Tensor  # [B, L, D1 + D2]
    negative_embeds: torch.Tensor | None
    pooled: torch.Tensor  # [B, P]
    negative_pooled: torch.Tensor | None
    mask: torch.Tensor | None  # as `prompts.Encoded.attention_mask`


class SDXL:
    name = "sdxl"
    sizes = FAMILY_SIZES["sdxl"]
    upcast_vae = True
    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, pipe: Any, first: PromptEncoder, second: PromptEncoder) -> None:
        self.pipe = pipe
        self.first, self.second = first, second
        # diffusers zeroes the negative conditioning when no negative prompt is given; an
        # empty negative prompt here is that case.
        self.zero_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", True))

    @classmethod
    def for_pipeline(cls, pipe: Any, *, long_prompts: str, clip_skip: int,
                     expansions: Mapping[str, str] | None = None) -> SDXL:
        first, second = (
            PromptEncoder(tokenizer, encoder, pipe.unet, long_prompts=long_prompts,
                          clip_skip=clip_skip, expansions=expansions, penultimate=True)
            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                       (pipe.tokenizer_2, pipe.text_encoder_2))
        )
        return cls(pipe, first, second)

    @property
    def prompts(self) -> PromptEncoder:
        return self.first

    @property
    def encoders(self) -> Sequence[PromptEncoder]:
        return (self.first, self.second)

    def encode(self, items: Sequence[GenerationItem], *, guided: bool,
               loras: Sequence[Choice] | None = None) -> Conditioning:
        """`loras`: each item's per-request adapters, applied to its rows in both encoders."""
        prompts = [i.prompt for i in items]
        negatives = [i.negative_prompt for i in items]
        a = self.first.encode(prompts, negatives, guidance=guided, loras=loras)
        b = self.second.encode(prompts, negatives, guidance=guided, loras=loras)
        if a.prompt_embeds.shape[1] != b.prompt_embeds.shape[1] or b.pooled is None:
            raise ValueError("SDXL: the two tokenizers split this prompt differently")
        embeds = torch.cat([a.prompt_embeds, b.prompt_embeds], dim=-1)
        negative, negative_pooled = None, None
        if a.negative_embeds is not None and b.negative_embeds is not None:
            negative = torch.cat([a.negative_embeds, b.negative_embeds], dim=-1)
            negative_pooled = b.negative_pooled
            empty = [i for i, text in enumerate(negatives) if not text and self.zero_empty]
            if empty and negative_pooled is not None:
                negative, negative_pooled = negative.clone(), negative_pooled.clone()
                negative[empty] = 0
                negative_pooled[empty] = 0
        return Conditioning(embeds, negative, b.pooled, negative_pooled, a.attention_mask)

    def time_ids(self, item: GenerationItem, like: torch.Tensor) -> torch.Tensor:
        """[1, 6]: original size, crop top-left, target size, as `_get_add_time_ids` makes
        them by default (no crop, original = target = the item's size)."""
        size = (item.height, item.width)
        return torch.tensor([[*size, 0, 0, *size]], dtype=like.dtype, device=like.device)

    def rows(self, item: GenerationItem, *, guided: bool, lora: Choice = ()) -> list[Row]:
        text = self.encode([item], guided=guided, loras=[lora] if lora else None)
        ids = self.time_ids(item, text.embeds)
        mask = text.mask
        positive = Row(text.embeds, None if mask is None else mask[-1],
                       {"text_embeds": text.pooled, "time_ids": ids})
        if text.negative_embeds is None or text.negative_pooled is None:
            return [positive]
        return [Row(text.negative_embeds, None if mask is None else mask[0],
                    {"text_embeds": text.negative_pooled, "time_ids": ids}), positive]

    @contextmanager
    def conditioning(self, items: Sequence[GenerationItem],
                     loras: Sequence[Choice] | None = None) -> Iterator[dict[str, Any]]:
        text = self.encode(items, guided=guided(self.pipe.unet, items[0]), loras=loras)
        with cross_attention_mask(self.pipe.unet, text.mask):
            yield {"prompt_embeds": text.embeds, "negative_prompt_embeds": text.negative_embeds,
                   "pooled_prompt_embeds": text.pooled,
                   "negative_pooled_prompt_embeds": text.negative_pooled}


AESTHETIC, NEGATIVE_AESTHETIC = 6.0, 2.5  # the refiner pipeline's defaults


class Refiner:
    """The SDXL refiner's conditioning (`StableDiffusionXLImg2ImgPipeline` with only
    `text_encoder_2`): the second encoder's penultimate states and pooled output; the pipeline
    adds the aesthetic-score time ids itself. An empty negative prompt is zeroed only when the
    refiner's config says so (Stability's refiner does not)."""

    def __init__(self, pipe: Any, second: PromptEncoder) -> None:
        self.pipe = pipe
        self.second = second
        self.zero_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", False))

    @classmethod
    def for_pipeline(cls, pipe: Any, *, long_prompts: str, clip_skip: int,
                     expansions: Mapping[str, str] | None = None) -> Refiner:
        return cls(pipe, PromptEncoder(pipe.tokenizer_2, pipe.text_encoder_2, pipe.unet,
                                       long_prompts=long_prompts, clip_skip=clip_skip,
                                       expansions=expansions, penultimate=True))

    def time_ids(self, item: GenerationItem, score: float, like: torch.Tensor) -> torch.Tensor:
        """[1, 5] (original size, crop top-left, aesthetic score) as the refiner pipeline's
        `_get_add_time_ids` makes them by default; [1, 6] with a target size for a refiner
        whose config does not ask for the aesthetic score."""
        size = (item.height, item.width)
        tail = (score,) if self.pipe.config.get("requires_aesthetics_score", False) else size
        return torch.tensor([[*size, 0, 0, *tail]], dtype=like.dtype, device=like.device)

    def rows(self, item: GenerationItem, *, guided: bool) -> list[Row]:
        """The item's refiner rows, encoded alone: the second encoder's states, its pooled
        output and the aesthetic-score time ids (6.0 for the prompt, 2.5 for the negative:
        the pipeline's defaults)."""
        text = self.second.encode([item.prompt], [item.negative_prompt], guidance=guided)
        mask = text.attention_mask
        assert text.pooled is not None
        positive = Row(text.prompt_embeds, None if mask is None else mask[-1],
                       {"text_embeds": text.pooled,
                        "time_ids": self.time_ids(item, AESTHETIC, text.prompt_embeds)})
        negative, pooled = text.negative_embeds, text.negative_pooled
        if negative is None or pooled is None:
            return [positive]
        if not item.negative_prompt and self.zero_empty:
            negative, pooled = torch.zeros_like(negative), torch.zeros_like(pooled)
        return [Row(negative, None if mask is None else mask[0],
                    {"text_embeds": pooled,
                     "time_ids": self.time_ids(item, NEGATIVE_AESTHETIC, negative)}), positive]

    @contextmanager
    def conditioning(self, items: Sequence[GenerationItem]) -> Iterator[dict[str, Any]]:
        """A whole batch's (one key's) refiner conditioning as the refiner pipeline's keyword
        arguments, valid inside the block (which may hook the refiner's UNet)."""
        negatives = [i.negative_prompt for i in items]
        text = self.second.encode([i.prompt for i in items], negatives,
                                  guidance=guided(self.pipe.unet, items[0]))
        negative, negative_pooled = text.negative_embeds, text.negative_pooled
        empty = [i for i, t in enumerate(negatives) if not t and self.zero_empty]
        if empty and negative is not None and negative_pooled is not None:
            negative, negative_pooled = negative.clone(), negative_pooled.clone()
            negative[empty] = 0
            negative_pooled[empty] = 0
        with cross_attention_mask(self.pipe.unet, text.attention_mask):
            yield {"prompt_embeds": text.prompt_embeds, "negative_prompt_embeds": negative,
                   "pooled_prompt_embeds": text.pooled,
                   "negative_pooled_prompt_embeds": negative_pooled}
