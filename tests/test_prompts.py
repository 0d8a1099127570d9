"""Prompt encoding: long prompts in 75-token chunks, batches of mixed lengths, truncate mode.

The tiny model's tokenizer has no merges: one token per character (a word's last one carries the
word end), so token counts are easy to make.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from community import same
from PIL.Image import Image

from batchserve.engines import GenerationItem
from batchserve.engines.diffusion import DiffusionEngine
from batchserve.engines.prompts import CHUNK, PromptEncoder, stack
from batchserve.settings import Settings

HEAD = "a red cube on a wooden table " * 4  # > 75 tokens on its own
SHORT = "a red cube"


def item(prompt: str, negative: str = "", seed: int = 7, guidance: float = 7.5) -> GenerationItem:
    return GenerationItem(prompt, negative, seed, 64, 64, 2, guidance)


@pytest.fixture(scope="module")
def chunking() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup=""))


@pytest.fixture(scope="module")
def truncating() -> DiffusionEngine:
    return DiffusionEngine.load(Settings(model="tiny", warmup="", long_prompts="truncate"))


def one(engine: DiffusionEngine, it: GenerationItem) -> Image:
    (image,) = engine.generate([it])
    return image


def tokens(engine: DiffusionEngine, text: str) -> int:
    return len(engine.prompts._token_ids([text])[0])


def test_short_prompts_encode_exactly_as_diffusers(chunking: DiffusionEngine,
                                                   truncating: DiffusionEngine) -> None:
    """Up to 75 tokens both modes are plain diffusers: same embeddings, same image."""
    pipe = chunking.pipe
    with torch.inference_mode():
        ours = chunking.prompts.encode([SHORT], ["blurry"], guidance=True)
        theirs, negative = pipe.encode_prompt(SHORT, "cpu", 1, True, "blurry")
        reference = pipe(prompt=SHORT, negative_prompt="blurry", width=64, height=64,
                         num_inference_steps=2, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(7)).images[0]
    assert ours.attention_mask is None
    assert torch.equal(ours.prompt_embeds, theirs)
    assert ours.negative_embeds is not None and torch.equal(ours.negative_embeds, negative)
    for engine in (chunking, truncating):
        assert same(one(engine, item(SHORT, "blurry")), reference)


def test_long_prompt_tail_changes_the_image_unless_truncated(
    chunking: DiffusionEngine, truncating: DiffusionEngine
) -> None:
    assert tokens(chunking, HEAD) > CHUNK
    a, b = item(HEAD + "in the rain"), item(HEAD + "under the sun")
    assert not same(one(chunking, a), one(chunking, b))
    assert same(one(truncating, a), one(truncating, b))  # the tail was cut, as diffusers does


def test_chunks_are_77_tokens_each_and_padding_is_masked(chunking: DiffusionEngine) -> None:
    long = HEAD * 2  # three chunks
    assert 2 * CHUNK < tokens(chunking, long) <= 3 * CHUNK
    with torch.inference_mode():
        text = chunking.prompts.encode([long, SHORT], ["", HEAD], guidance=True)
    assert text.prompt_embeds.shape == (2, 3 * 77, 32)
    assert text.negative_embeds is not None and text.negative_embeds.shape == (2, 3 * 77, 32)
    mask = text.attention_mask
    assert mask is not None and mask.shape == (4, 3 * 77)
    # diffusers' order: negatives ("" one chunk, HEAD two), then prompts (three, one)
    assert mask.sum(dim=1).tolist() == [77, 2 * 77, 3 * 77, 77]
    with torch.inference_mode():
        alone = chunking.prompts.encode([SHORT], [""], guidance=False)
    assert alone.negative_embeds is None and alone.attention_mask is None
    assert torch.equal(text.prompt_embeds[1, :77], alone.prompt_embeds[0])


def test_long_and_short_prompts_batch_and_keep_their_images(chunking: DiffusionEngine) -> None:
    """Same request, same image, alone or batched with prompts of other lengths."""
    items = [item(HEAD + "in the rain"), item(SHORT, seed=3), item(SHORT, HEAD * 2, seed=4),
             item(HEAD * 3, "blurry", seed=5)]
    batched = chunking.generate(items)
    for it, image in zip(items, batched, strict=True):
        assert same(image, one(chunking, it)), it.prompt[:20]


def test_mixed_lengths_without_guidance(chunking: DiffusionEngine) -> None:
    items = [item(HEAD * 2, guidance=1.0), item(SHORT, seed=3, guidance=1.0)]
    batched = chunking.generate(items)
    for it, image in zip(items, batched, strict=True):
        assert same(image, one(chunking, it))


@pytest.mark.parametrize("guidance", [True, False])
def test_items_encoded_apart_stack_like_a_batch(chunking: DiffusionEngine,
                                                guidance: bool) -> None:
    """What a step-wise engine does: encode each item when it joins, stack the running ones."""
    prompts, negatives = [HEAD * 2, SHORT, HEAD], ["", HEAD * 3, "blurry"]
    with torch.inference_mode():
        together = chunking.prompts.encode(prompts, negatives, guidance=guidance)
        apart = stack([chunking.prompts.encode([p], [n], guidance=guidance)
                       for p, n in zip(prompts, negatives, strict=True)])
    assert together.attention_mask is not None and apart.attention_mask is not None
    assert torch.equal(together.attention_mask, apart.attention_mask)
    keep = together.attention_mask
    n = len(prompts)
    pairs = [(together.prompt_embeds, apart.prompt_embeds, keep[-n:])]
    if guidance:
        assert together.negative_embeds is not None and apart.negative_embeds is not None
        pairs.append((together.negative_embeds, apart.negative_embeds, keep[:n]))
    else:
        assert apart.negative_embeds is None
    for a, b, real in pairs:
        assert a.shape == b.shape
        assert torch.allclose(a[real], b[real], atol=1e-5)
    with torch.inference_mode():
        short = stack([chunking.prompts.encode([SHORT], [""], guidance=True)] * 2)
    assert short.attention_mask is None  # nothing padded: plain diffusers conditioning


@contextmanager
def counted_encoder(prompts: PromptEncoder) -> Iterator[list[int]]:
    """The rows of each text-encoder call `prompts` makes inside the block, its row cache
    emptied first."""
    calls: list[int] = []
    run = prompts._run_encoder

    def counted(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        calls.append(len(rows))
        return run(rows)

    prompts._rows.clear()
    prompts._run_encoder = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del prompts._run_encoder


def test_a_row_seen_before_is_not_encoded_again_and_gives_the_same_embedding(
    chunking: DiffusionEngine,
) -> None:
    """The negative prompt most requests share is encoded once; a cached row equals the row
    encoded afresh."""
    prompts = chunking.prompts
    with counted_encoder(prompts) as calls, torch.inference_mode():
        first = prompts.encode(["a red fox"], ["blurry, low quality"], guidance=True)
        second = prompts.encode(["a blue owl"], ["blurry, low quality"], guidance=True)
        # both prompts' rows and the shared negative are all known now: no encoder call
        again = prompts.encode(["a blue owl", "a red fox"], ["blurry, low quality"] * 2,
                               guidance=True)
    with torch.inference_mode():
        fresh = prompts._run_encoder(prompts._token_ids(["blurry, low quality"]))[0]
    assert calls == [2, 1]  # the second request encoded only its own prompt
    assert torch.equal(second.negative_embeds, first.negative_embeds)
    torch.testing.assert_close(first.negative_embeds[0], fresh[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(again.prompt_embeds[1], first.prompt_embeds[0])
    assert torch.equal(again.prompt_embeds[0], second.prompt_embeds[0])


def test_a_text_is_tokenized_once_while_it_stays_recent(chunking: DiffusionEngine) -> None:
    """A joiner's prompt encoded ahead is not tokenized again when it joins, nor the shared
    negative prompt for every item; the ids are the tokenizer's."""
    prompts = chunking.prompts
    tokenizer = prompts.tokenizer
    asked: list[list[str]] = []

    def counted(texts: list[str], **kwargs: object) -> object:
        asked.append(list(texts))
        return tokenizer(texts, **kwargs)

    prompts._ids.clear()
    prompts.tokenizer = counted
    try:
        first = prompts._token_ids(["a red fox", "", "a blue owl"])
        again = prompts._token_ids(["a blue owl", "", "a grey cat"])
    finally:
        prompts.tokenizer = tokenizer
    assert asked == [["a red fox", "", "a blue owl"], ["a grey cat"]]
    assert again[0] == first[2] and again[1] == first[1]
    assert again[2] == tokenizer(["a grey cat"], add_special_tokens=False).input_ids[0]


def test_prompts_encoded_ahead_are_not_encoded_again_when_their_items_join(
    chunking: DiffusionEngine,
) -> None:
    """`encode_ahead` (queued items at saturation) encodes in one call what each joiner's
    `prepare` would have encoded alone; the joiner's image is its image alone."""
    queued = [item(f"a lighthouse number {n}", "fog", seed=n) for n in range(4)]
    with counted_encoder(chunking.prompts) as calls:
        chunking.encode_ahead(queued)
        assert calls == [5]  # four prompts and the shared negative, one call
        states = [chunking.prepare([it])[0] for it in queued]
        assert calls == [5]  # each joiner found its rows
    for _ in range(queued[0].inference_steps):
        chunking.step(states)
    images = chunking.finish(states)
    assert same(images[2], one(chunking, queued[2]))
