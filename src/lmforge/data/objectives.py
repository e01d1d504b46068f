"""Pre-training objectives for encoders and encoder-decoders: BERT's masked LM and T5's span corruption.

Both batch makers are pure functions of (seed, index), like `RandomWindows`, so resuming replays exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lmforge.data.batches import random_windows, require_tokens
from lmforge.errors import UserError

IGNORE_INDEX = -100  # PyTorch cross_entropy's default ignore_index, the value lmforge.models uses too

# BERT (Devlin et al. 2019, section 3.1): corrupt 15% of the tokens; of those, 80% become [MASK],
# 10% a random token and 10% stay as they are, so the model cannot rely on seeing [MASK].
MASK_RATE = 0.15
MASK_TOKEN_SHARE = 0.8
RANDOM_TOKEN_SHARE = 0.1


# -- masked LM (BERT) ------------------------------------------------------------------------------
def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_id: int,
                random_ids: torch.Tensor | Sequence[int], rate: float = MASK_RATE,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption of (B, T) ids -> (inputs, labels); labels hold the original ids where chosen, else -100.

    Each maskable position is chosen with probability `rate`, and every row with a maskable token gets at least
    one, so no row drops out of the loss. `random_ids` are the ids a random replacement may take.
    """
    if not 0 < rate <= 1:
        raise UserError(f"mask rate={rate} must be in (0, 1]; BERT uses {MASK_RATE}")
    if maskable.shape != input_ids.shape:
        raise UserError(f"maskable has shape {tuple(maskable.shape)} but input_ids {tuple(input_ids.shape)}; "
                        "pass one flag per token")
    random_ids = torch.as_tensor(random_ids, dtype=torch.long, device=input_ids.device)
    if random_ids.numel() == 0:
        raise UserError("random_ids is empty; pass the ids a random replacement may take (e.g. all non-special ids)")

    def uniform() -> torch.Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=input_ids.device)

    chosen = (uniform() < rate) & maskable
    # A random maskable position per row (non-maskable ones score -1), forced on where a row chose nothing.
    fallback = uniform().masked_fill(~maskable, -1.0).argmax(dim=1, keepdim=True)
    missing = ~chosen.any(dim=1, keepdim=True) & maskable.any(dim=1, keepdim=True)
    chosen |= torch.zeros_like(chosen).scatter(1, fallback, missing)

    action = uniform()
    to_mask = chosen & (action < MASK_TOKEN_SHARE)
    to_random = chosen & (action >= MASK_TOKEN_SHARE) & (action < MASK_TOKEN_SHARE + RANDOM_TOKEN_SHARE)
    draws = torch.randint(len(random_ids), input_ids.shape, generator=generator, device=input_ids.device)
    inputs = torch.where(to_random, random_ids[draws], input_ids).masked_fill(to_mask, mask_id)
    return inputs, input_ids.masked_fill(~chosen, IGNORE_INDEX)


class MaskedWindows:
    """Callable: index -> {"input_ids", "labels"} of shape (batch_size, context) for masked-LM training.

    Windows of the token stream as `RandomWindows` draws them, corrupted by `mask_tokens`; special ids
    (document separators, padding) are never chosen.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int, mask_id: int,
                 random_ids: torch.Tensor | Sequence[int], special_ids: Sequence[int], split: str = "train",
                 rate: float = MASK_RATE) -> None:
        require_tokens(tokens, context, "context_length", split)
        self.tokens, self.batch_size, self.context, self.seed = tokens, batch_size, context, seed
        self.mask_id, self.rate = mask_id, rate
        self.random_ids = torch.as_tensor(random_ids, dtype=torch.long)
        self.special_ids = torch.as_tensor(list(special_ids), dtype=torch.long)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        windows = torch.from_numpy(random_windows(self.tokens, rng, self.batch_size, self.context))
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))  # also a function of (seed, index)
        maskable = ~torch.isin(windows, self.special_ids)
        inputs, labels = mask_tokens(windows, maskable, self.mask_id, self.random_ids, self.rate, generator)
        return {"input_ids": inputs, "labels": labels}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context


# -- span corruption (T5) --------------------------------------------------------------------------
def _check_span_options(noise_density: float, mean_span_length: float) -> None:
    if not 0 < noise_density < 1:
        raise UserError(f"noise_density={noise_density} must be in (0, 1); T5 uses 0.15")
    if mean_span_length < 1:
        raise UserError(f"mean_span_length={mean_span_length} must be at least 1; T5 uses 3.0")


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length`: a pure function, so batch shapes are known ahead."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span_length))
    # Each noise span and each of the (as many) kept spans needs at least one token.
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `parts` non-empty segments that add up to `total`, uniformly over all such splits."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate(([0], cuts, [total])))


def span_corruption(ids: Sequence[int] | np.ndarray, sentinel_ids: Sequence[int], noise_density: float = 0.15,
                    mean_span_length: float = 3.0, *, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """T5's objective (Raffel et al. 2020): drop random spans from `ids`, predict them after their sentinels.

    inputs: the kept tokens with each dropped span replaced by the next sentinel; targets: each sentinel followed
    by the span it replaced, closed by one more sentinel. The sequence starts with a kept span and ends with a
    dropped one, as in T5. No EOS is added.
    """
    ids = [int(i) for i in ids]
    if len(ids) < 2:
        raise UserError(f"span corruption needs at least 2 tokens, got {len(ids)}; drop or merge shorter sequences")
    _check_span_options(noise_density, mean_span_length)
    num_noise, num_spans = _span_counts(len(ids), noise_density, mean_span_length)
    if num_spans + 1 > len(sentinel_ids):
        raise UserError(f"{len(ids)} tokens make {num_spans} noise spans, needing {num_spans + 1} sentinels but "
                        f"only {len(sentinel_ids)} were given; train the tokenizer with more sentinels or use "
                        "shorter sequences")
    noise_lengths = _random_partition(num_noise, num_spans, rng)
    kept_lengths = _random_partition(len(ids) - num_noise, num_spans, rng)
    inputs, targets, pos = [], [], 0
    for sentinel, kept, noise in zip(sentinel_ids[:num_spans], kept_lengths, noise_lengths, strict=True):
        inputs += [*ids[pos:pos + kept], sentinel]
        targets += [sentinel, *ids[pos + kept:pos + kept + noise]]
        pos += kept + noise
    return inputs, [*targets, sentinel_ids[num_spans]]


def reconstruct(inputs: Sequence[int], targets: Sequence[int], sentinel_ids: Sequence[int]) -> list[int]:
    """The original sequence back from `span_corruption`'s (inputs, targets): each sentinel -> its span."""
    sentinels = {int(s) for s in sentinel_ids}
    spans: dict[int, list[int]] = {}
    current = None
    for token in map(int, targets):
        if token in sentinels:
            current = spans.setdefault(token, [])
        elif current is None:
            raise UserError(f"targets start with token {token}, not a sentinel; pass span_corruption's targets")
        else:
            current.append(token)
    out = []
    for token in map(int, inputs):
        if token in sentinels and token not in spans:
            raise UserError(f"sentinel {token} in the inputs has no span in the targets; pass matching pairs")
        out += spans[token] if token in sentinels else [token]
    return out


def _raw_length(input_length: int, noise_density: float, mean_span_length: float) -> int:
    """The longest raw window whose corrupted inputs plus EOS fit in `input_length` (T5 sizes windows this way)."""
    def inputs_length(n: int) -> int:
        num_noise, num_spans = _span_counts(n, noise_density, mean_span_length)
        return n - num_noise + num_spans + 1

    # inputs_length(n) > n * (1 - density) + 1, so no longer window can fit.
    fits = [n for n in range(2, math.ceil(input_length / (1 - noise_density)) + 2) if inputs_length(n) <= input_length]
    if not fits:
        raise UserError(f"input_length={input_length} is too short for span corruption; use at least 3")
    return fits[-1]


class SpanCorruptionBatches:
    """Callable: index -> {"input_ids", "attention_mask"} (batch_size, input_length) and "labels"
    (batch_size, target_length) for T5-style pre-training; inputs and targets both end in EOS.

    Every window has the same raw length, chosen so the corrupted inputs fill `input_length`, so the
    shapes are fixed; any remainder is padded (mask 0, labels -100).
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, input_length: int, seed: int,
                 sentinel_ids: Sequence[int], eos_id: int, pad_id: int, split: str = "train",
                 noise_density: float = 0.15, mean_span_length: float = 3.0) -> None:
        _check_span_options(noise_density, mean_span_length)
        self.raw_length = _raw_length(input_length, noise_density, mean_span_length)
        num_noise, num_spans = _span_counts(self.raw_length, noise_density, mean_span_length)
        if num_spans + 1 > len(sentinel_ids):
            raise UserError(f"input_length={input_length} makes {num_spans} noise spans, needing {num_spans + 1} "
                            f"sentinels but only {len(sentinel_ids)} were given; train the tokenizer with more "
                            "sentinels or use a smaller input_length")
        require_tokens(tokens, self.raw_length, "raw_length", split)
        self.tokens, self.batch_size, self.input_length, self.seed = tokens, batch_size, input_length, seed
        self.sentinel_ids, self.eos_id, self.pad_id = list(sentinel_ids), eos_id, pad_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.target_length = num_noise + num_spans + 2  # a sentinel per span, the closing sentinel, EOS

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        windows = random_windows(self.tokens, rng, self.batch_size, self.raw_length)
        input_ids = np.full((self.batch_size, self.input_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((self.batch_size, self.input_length), dtype=np.int64)
        labels = np.full((self.batch_size, self.target_length), IGNORE_INDEX, dtype=np.int64)
        for row, window in enumerate(windows):
            row_rng = np.random.default_rng((self.seed, index, row))
            inputs, targets = span_corruption(window, self.sentinel_ids, self.noise_density,
                                              self.mean_span_length, rng=row_rng)
            inputs, targets = [*inputs, self.eos_id], [*targets, self.eos_id]
            input_ids[row, :len(inputs)] = inputs
            attention_mask[row, :len(inputs)] = 1
            labels[row, :len(targets)] = targets
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.from_numpy(labels)}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.input_length
