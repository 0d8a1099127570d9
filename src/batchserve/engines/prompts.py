"""Prompt text -> the UNet's cross-attention conditioning, for whole batches of different prompts.

CLIP reads 77 tokens (75 plus begin/end). `chunk` mode encodes longer prompts the way the popular
web UIs do: 75-token chunks, each encoded as its own 77-token sequence, concatenated along the
sequence axis; `truncate` cuts at 75 tokens like plain diffusers. A prompt of up to 75 tokens
encodes exactly as diffusers' `encode_prompt` does in both modes.

Items of one batch may need different chunk counts (and a prompt and its negative prompt too).
Each is padded to the batch's longest with the encoding of the empty prompt (what the web UIs
pad with) and `attention_mask` marks the padding, which `cross_attention_mask` hands to the UNet
so padded positions get no attention: an item's image is the same alone or in any batch.

`PromptEncoder.encode` is the one entry point; the whole-batch engine and a step-wise engine call
it the same way (the latter can encode items apart and join them with `stack`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch

from .protocol import GenerationItem

if TYPE_CHECKING:
    from .lora.rows import Choice
    from .lora.runtime import LoraRuntime

CHUNK = 75  # content tokens per CLIP sequence; +2 for the begin and end tokens


@dataclass(frozen=True, slots=True)
class Encoded:
    """One batch's conditioning, padded to a common length L (a multiple of 77)."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor | None  # [B, L, D]; None without classifier-free guidance
    attention_mask: torch.Tensor | None
    """[2B, L] (negatives first, as diffusers batches them) or [B, L] without guidance, True
    where a token is real; None when no item needed padding."""
    pooled: torch.Tensor | None = None
    """[B, P]: a projecting encoder's pooled output of each prompt's first chunk (SDXL's
    second encoder); None for encoders without one."""
    negative_pooled: torch.Tensor | None = None


ROW_CACHE = 64
"""Encoded rows kept per text encoder (`PromptEncoder._cached_rows`): 77 x D each, ~0.4 MB for
SDXL's bigG in fp32."""
TOKEN_CACHE = 256
"""Texts whose token ids are kept per tokenizer (`PromptEncoder._token_ids`)."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The values of the last `size` keys used, made for many keys at once: `get` makes the
    missing ones in one call (one tokenizer or encoder call for a batch, not one per key)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: dict[K, V] = {}  # least recently used first

    def clear(self) -> None:
        self._values.clear()

    def get(self, keys: Sequence[K], make: Callable[[list[K]], Sequence[V]]) -> list[V]:
        values = self._values
        found = {k: values[k] for k in keys if k in values}
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing:
            found.update(zip(missing, make(missing), strict=True))
        for k in keys:  # most recently used last
            values.pop(k, None)
            values[k] = found[k]
        while len(values) > self.size:
            values.pop(next(iter(values)))
        return [found[k] for k in keys]


class PromptEncoder:
    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        unet: Any,
        *,
        long_prompts: str = "chunk",
        clip_skip: int = 1,
        expansions: Mapping[str, str] | None = None,
        penultimate: bool = False,
    ) -> None:
        """`penultimate`: SDXL's rule, hidden states counted from the penultimate layer with no
        final layer norm (clip skip 1 = penultimate, as diffusers' SDXL `clip_skip=None`)."""
        if long_prompts not in ("chunk", "truncate"):
            raise ValueError(f"long_prompts={long_prompts!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet  # gets the padding mask (`conditioning`)
        self.lora: LoraRuntime | None = None  # per-request LoRA's text-encoder part
        self.chunked = long_prompts == "chunk"
        self.clip_skip = clip_skip
        self.penultimate = penultimate
        # The tokenizer matches added tokens case-insensitively and inside words; so does this.
        # (diffusers' `maybe_convert_prompt` compares the lower-cased pieces case-sensitively and
        # misses mixed-case names like `EasyNegative`.)
        self._expansions = {k.lower(): v for k, v in (expansions or {}).items()}
        self._rows: Recent[tuple[int, ...], tuple[torch.Tensor, torch.Tensor | None]] = (
            Recent(ROW_CACHE))
        """`_cached_rows`': a row's token ids -> its hidden states [77, D] and pooled [P]."""
        self._ids: Recent[str, list[int]] = Recent(TOKEN_CACHE)
        """`_token_ids`': a text -> its token ids (a step-wise engine's joiner is tokenized
        when its prompt is encoded ahead and again when it joins; the shared negative prompt
        with every item)."""
        names = sorted(self._expansions, key=len, reverse=True)
        self._pattern = (
            re.compile("|".join(re.escape(n) for n in names) + r"(?!_\d)", re.IGNORECASE)
            if names else None
        )

    @classmethod
    def for_pipeline(cls, pipe: Any, *, long_prompts: str, clip_skip: int,
                     expansions: Mapping[str, str] | None = None) -> PromptEncoder:
        return cls(pipe.tokenizer, pipe.text_encoder, pipe.unet, long_prompts=long_prompts,
                   clip_skip=clip_skip, expansions=expansions)

    def encode(self, prompts: Sequence[str], negatives: Sequence[str], *,
               guidance: bool, loras: Sequence[Choice] | None = None) -> Encoded:
        """`guidance`: classifier-free guidance is on (diffusers: guidance_scale > 1), so the
        negative prompts are encoded too. `loras`: each prompt's adapters (per-request LoRA),
        applied to its prompt's and negative prompt's rows. Run it under
        `torch.inference_mode()`."""
        texts = list(prompts) + (list(negatives) if guidance else [])
        chunked = [self._chunks(ids) for ids in self._token_ids(texts)]
        longest = max(len(c) for c in chunked)
        padded = longest > 1 and any(len(c) < longest for c in chunked)
        rows = [chunk for chunks in chunked for chunk in chunks]
        choices = None
        if loras is not None:
            n = len(prompts)
            choices = [loras[t % n] for t, chunks in enumerate(chunked) for _ in chunks]
        if padded:
            rows.append([])  # the empty prompt, to pad with (masked: no LoRA needed)
            choices = None if choices is None else [*choices, ()]
        hidden, pooled_rows = self._encode_rows(rows, choices)
        embeds, masks, firsts, at = [], [], [], 0
        for chunks in chunked:
            firsts.append(at)
            own = hidden[at:at + len(chunks)]
            at += len(chunks)
            pad = longest - len(chunks)
            pieces = [*own, *([hidden[-1]] * pad)]
            embeds.append(torch.cat(pieces))
            seq = own.shape[1]
            masks.append(torch.tensor([True] * seq * len(chunks) + [False] * seq * pad))
        stacked = torch.stack(embeds)
        n = len(prompts)
        mask = None
        if padded:
            order = masks[n:] + masks[:n]  # diffusers batches [negatives; prompts]
            mask = torch.stack(order).to(stacked.device)
        pooled = None if pooled_rows is None else pooled_rows[firsts]
        return Encoded(stacked[:n], stacked[n:] if guidance else None, mask,
                       None if pooled is None else pooled[:n],
                       None if pooled is None or not guidance else pooled[n:])

    @contextmanager
    def conditioning(self, items: Sequence[GenerationItem],
                     loras: Sequence[Choice] | None = None) -> Iterator[Encoded]:
        """A whole-batch engine's conditioning for `items` (one batch key): encoded, with the
        padding mask handed to the UNet inside the block. Enter it under `inference_mode()`."""
        first = items[0]
        # When diffusers' pipeline applies classifier-free guidance (its own rule).
        guidance = first.guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        text = self.encode([i.prompt for i in items], [i.negative_prompt for i in items],
                           guidance=guidance, loras=loras)
        with cross_attention_mask(self.unet, text.attention_mask):
            yield text

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids (embedding names expanded), the tokenizer called once for
        those not among the last `TOKEN_CACHE` (a tokenizer call costs more than a CPU step's
        scheduler update; the ids are read, never changed)."""
        return self._ids.get(texts, self._tokenize)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        if self._pattern is not None:
            pattern, expand = self._pattern, self._expansions
            texts = [pattern.sub(lambda m: expand[m.group(0).lower()], t) for t in texts]
        ids: list[list[int]] = self.tokenizer(
            texts, add_special_tokens=False, truncation=False, verbose=False
        ).input_ids
        return ids

    def _chunks(self, ids: list[int]) -> list[list[int]]:
        if not self.chunked or len(ids) <= CHUNK:
            return [ids[:CHUNK]]
        return [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]

    def _encode_rows(self, rows: list[list[int]], choices: Sequence[Choice] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[rows, 77, D]: each row as `[BOS] tokens [EOS] pad...`, as diffusers tokenizes; with
        the pooled projection [rows, P] of an encoder that has one (`penultimate` only).
        `choices`: each row's LoRA adapters."""
        if choices is not None and self.lora is not None and any(choices):
            with self.lora.text_rows(choices):
                return self._run_encoder(rows)
        return self._cached_rows(rows)

    def _cached_rows(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`_run_encoder` for rows without per-request LoRA, each row encoded once while it
        stays among the last `ROW_CACHE` used. Rows are independent in a text encoder, so a
        cached row is what encoding it again gives (up to batched kernels' rounding). What it
        saves: the negative prompt, the same for most requests ("" or a house default), is
        encoded once rather than for every item; a step-wise engine encodes each joiner alone,
        where that is half of its text-encoder work (two encoders' worth for SDXL)."""
        def encode(missing: list[tuple[int, ...]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
            hidden, pooled = self._run_encoder([list(k) for k in missing])
            return [(hidden[n], None if pooled is None else pooled[n])
                    for n in range(len(missing))]

        found = self._rows.get([tuple(row) for row in rows], encode)
        out = torch.stack([hidden for hidden, _ in found])
        firsts = [pooled for _, pooled in found]
        return out, (None if firsts[0] is None
                     else torch.stack([p for p in firsts if p is not None]))

    def _run_encoder(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        tok = self.tokenizer
        length = CHUNK + 2
        batch = [[tok.bos_token_id, *r, tok.eos_token_id] for r in rows]
        batch = [r + [tok.pad_token_id] * (length - len(r)) for r in batch]
        device = self.text_encoder.device
        ids = torch.tensor(batch, dtype=torch.long, device=device)
        pooled = None
        if self.penultimate:
            result = self.text_encoder(ids, output_hidden_states=True)
            if result[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
                pooled = result[0].to(dtype=self.text_encoder.dtype)
            out = result.hidden_states[-(self.clip_skip + 1)]
        elif self.clip_skip == 1:
            out = self.text_encoder(ids)[0]
        else:
            # Web-UI numbering: skip N-1 layers from the end, then the final layer norm (as
            # diffusers' `clip_skip=N-1` does).
            states = self.text_encoder(ids, output_hidden_states=True).hidden_states
            out = _final_layer_norm(self.text_encoder)(states[-self.clip_skip])
        hidden: torch.Tensor = out.to(dtype=self.text_encoder.dtype)
        return hidden, pooled


def stack(parts: Sequence[Encoded]) -> Encoded:
    """Joins conditionings encoded apart (a step-wise engine encodes each item once, when it
    joins) into one batch, padded to the longest and masked, as `encode` does for a batch.
    All parts must agree on guidance (negatives present or not)."""
    guided = parts[0].negative_embeds is not None
    if any((p.negative_embeds is not None) != guided for p in parts):
        raise ValueError("stack: parts disagree on classifier-free guidance")
    length = max(p.prompt_embeds.shape[1] for p in parts)
    positives, negatives, pos_masks, neg_masks = [], [], [], []
    for part in parts:
        rows, own = part.prompt_embeds.shape[:2]
        mask = part.attention_mask
        if mask is None:
            mask = torch.ones(2 * rows if guided else rows, own, dtype=torch.bool,
                              device=part.prompt_embeds.device)
        positives.append(_pad(part.prompt_embeds, length))
        pos_masks.append(_pad(mask[rows:] if guided else mask, length))
        if part.negative_embeds is not None:
            negatives.append(_pad(part.negative_embeds, length))
            neg_masks.append(_pad(mask[:rows], length))
    masks = torch.cat(neg_masks + pos_masks)
    return Encoded(torch.cat(positives), torch.cat(negatives) if guided else None,
                   None if bool(masks.all()) else masks)


def _pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pads dimension 1 (the sequence) to `length`; False for a mask."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=1)


def _final_layer_norm(text_encoder: Any) -> Any:
    # transformers >= 5.6 flattened CLIPTextModel; older versions wrap it in `.text_model`.
    model = getattr(text_encoder, "text_model", text_encoder)
    return model.final_layer_norm


@contextmanager
def cross_attention_mask(unet: Any, mask: torch.Tensor | None) -> Iterator[None]:
    """Hands `mask` to every UNet call inside the block as `encoder_attention_mask` (diffusers'
    pipelines have no argument for it). Nothing is hooked when `mask` is None."""
    if mask is None:
        yield
        return

    def add_mask(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        return args, {**kwargs, "encoder_attention_mask": mask}

    handle = unet.register_forward_pre_hook(add_mask, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
