"""Causal-LM batches: random windows of a token array, drawn as a pure function of the batch index.

Because batch i depends only on (seed, i), the data position of a run is just its step count:
resuming at step s replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import UserError


class RandomWindows:
    """Callable: index -> {"input_ids", "labels"} of shape (batch_size, context), labels shifted by one."""

    def __init__(self, tokens: np.ndarray, batch_size: int, context: int, seed: int = 0, split: str = "train") -> None:
        if len(tokens) < context + 1:
            raise UserError(
                f"the {split} split has {len(tokens)} tokens, fewer than context_length+1={context + 1}; "
                "add more data, lower data.val_fraction, or use a smaller --model.context_length"
            )
        self.tokens, self.batch_size, self.context, self.seed = tokens, batch_size, context, seed
        self._window = np.arange(context + 1)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        starts = rng.integers(0, len(self.tokens) - self.context, size=self.batch_size)
        windows = torch.from_numpy(self.tokens[starts[:, None] + self._window].astype(np.int64))
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.context
