"""Prompt tuning (Lester et al. 2021): N trainable "virtual token" embeddings in front of the input.

The soft prompt sits in the input stack (a causal LM's decoder, an encoder-decoder's or encoder's
encoder) as its `prompt` hook: it prepends the vectors on the first forward of a sequence, widens
the attention mask to cover them, and the stack drops their positions from its output again, so
logits, labels and the encoder output keep the shapes of the plain model. With a KV cache the virtual
tokens are cached once, like a prompt. Only the N×d embedding trains: one small file per task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.nn import TransformerStack
from lmforge.peft.core import PeftModule, freeze, record_method, require_fresh


class SoftPrompt(PeftModule):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(init.detach().clone())  # (n_tokens, d_model)

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None,
                past: int) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(x, mask covering past+T tokens, past) → (x with the prompt in front on a sequence's first
        forward, the mask widened by the prompt's always-visible positions, positions added to x)."""
        batch = x.shape[0]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.length), attention_mask], dim=1)
        if past > 0:  # already in the KV cache
            return x, attention_mask, 0
        prompt = self.embedding.to(x.dtype).expand(batch, -1, -1)
        return torch.cat([prompt, x], dim=1), attention_mask, self.length


def input_stack(model: nn.Module) -> TransformerStack:
    """The stack that reads the input tokens: an encoder's (encoder-decoder too), else the decoder."""
    stack = getattr(model, "encoder", None)
    stack = stack if isinstance(stack, TransformerStack) else getattr(model, "decoder", None)
    if not isinstance(stack, TransformerStack):
        raise UserError(f"a {type(model).__name__} has no transformer stack to put a soft prompt in front of")
    return stack


def apply_prompt_tuning(model: nn.Module, n_tokens: int = 20, seed: int = 0,
                        init_ids: Sequence[int] | None = None) -> nn.Module:
    """Freeze the model and put a trainable soft prompt of n_tokens in front of its input. The vectors
    start as the embeddings of vocabulary tokens: init_ids (e.g. a tokenized task description, repeated
    to length) or n_tokens drawn at random with `seed`."""
    require_fresh(model, "prompt")
    stack = input_stack(model)
    context = model.cfg.context_length
    if not 1 <= n_tokens < context:
        raise UserError(f"n_tokens={n_tokens} must be between 1 and context_length-1={context - 1} "
                        "(the virtual tokens take context positions); 20-100 is usual")
    weight = model.embed.weight.detach()
    if init_ids:
        ids = torch.tensor(list(init_ids) * (n_tokens // len(init_ids) + 1))[:n_tokens]
        if int(ids.max()) >= weight.shape[0] or int(ids.min()) < 0:
            raise UserError(f"init_ids must be token ids below vocab_size={weight.shape[0]}")
    else:
        ids = torch.randint(0, weight.shape[0], (n_tokens,), generator=torch.Generator().manual_seed(seed))
    freeze(model)
    stack.prompt = SoftPrompt(weight[ids.to(weight.device)].float())
    record_method(model, "prompt", {"n_tokens": n_tokens, "seed": seed,
                                    "init_ids": list(init_ids) if init_ids else None})
    return model
