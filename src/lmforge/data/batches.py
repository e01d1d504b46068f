"""Causal-LM batches: random windows of a token array, drawn as a pure function of the batch index.

Because batch i depends only on (seed, i), the data position of a run is just its step count:
resuming at step s replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmforge.errors import UserError


def require_tokens(tokens: np.ndarray, needed: int, what: str, split: str) -> None:
    """The one too-short-split error every batch maker raises; `what` names the length, as the user set it."""
    if len(tokens) < needed:
        raise UserError(
            f"the {split} split has {len(tokens)} tokens, fewer than {what}={needed}; "
            "add more data, lower data.val_fraction, or use a smaller --model.context_length"
        )


def random_windows(tokens: np.ndarray, rng: np.random.Generator, batch_size: int, length: int) -> np.ndarray:
    """(batch_size, length) int64 windows of `tokens` at uniformly random starts."""
    starts = rng.integers(0, len(tokens) - length + 1, size=batch_size)
    return tokens[starts[:, None] + np.arange(length)].astype(np.int64)


class RandomWindows:
    """Callable: index -> {"input_ids", "labels"} of shape (batch_size, context), labels shifted by one."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int = 0, split: str = "train") -> None:
        require_tokens(tokens, context + 1, "context_length+1", split)
        self.tokens, self.batch_size, self.context, self.seed = tokens, batch_size, context, seed

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        windows = torch.from_numpy(random_windows(self.tokens, rng, self.batch_size, self.context + 1))
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context


def pad_batch(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu",
              side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths with a 1/0 attention mask. Decoders pad on the left so
    every row's next token lands in the same column; encoders pad on the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            cols = slice(width - len(prompt), width) if side == "left" else slice(0, len(prompt))
            ids[row, cols] = torch.as_tensor(prompt)
            mask[row, cols] = 1
    return ids.to(device), mask.to(device)
