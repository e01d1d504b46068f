"""Per-token log-probabilities of completions under a causal LM: what DPO, PPO, GRPO and their KL terms read.

Every pitfall public RLHF code trips on is handled here once:
- only completion tokens count (`completion_mask`), prompt and padding are zero;
- the mask is built from lengths (`pack_pairs`), never from `ids != pad_id`, so when pad == EOS the EOS that
  ends a completion is still scored;
- left-padded rows get the same positions as unpadded ones: the causal stack numbers each row's real tokens
  from the attention mask (`lmforge.nn.stack.position_ids_for`), so a row's log-probs do not depend on padding;
- scoring happens in `scoring_mode`, with dropout off in every model involved;
- the vocabulary projection and log-softmax run in fp32 on the completion positions only (N x V, not B x T x V).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.models import CausalLM
from lmforge.nn import TransformerStack

PAD_SIDES = ("left", "right")


@contextlib.contextmanager
def scoring_mode(*models: nn.Module) -> Iterator[None]:
    """eval() every model for the block (dropout off), then restore each one's own train/eval mode."""
    modes = [(model, model.training) for model in models]
    for model, _ in modes:
        model.eval()
    try:
        yield
    finally:
        for model, was_training in modes:
            model.train(was_training)


def _causal(model: nn.Module) -> CausalLM:
    inner = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    if not isinstance(inner, CausalLM):
        family = getattr(getattr(inner, "cfg", None), "family", type(inner).__name__)
        raise UserError(f"completion log-probs need a causal language model; this is a {family} model "
                        "(seq2seq and encoder models are not supported here)")
    return inner


def completion_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) fp32: column t holds log p(input_ids[:, t+1] | input_ids[:, :t+1]) where token t+1 is a
    completion token preceded by a real token, and 0 everywhere else.

    completion_mask (B,T) is 1 on completion tokens, 0 on prompt and padding; attention_mask (B,T) is 1 on
    real tokens. Gradients flow through the returned values (DPO and PPO train through this function).
    """
    causal = _causal(model)
    scored = completion_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    logits = _predicting_logits(causal, input_ids, attention_mask, scored).float()
    targets = input_ids[:, 1:][scored]
    picked = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = torch.zeros(scored.shape, dtype=torch.float32, device=input_ids.device)
    out[scored] = picked
    return out


def _predicting_logits(model: CausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       scored: torch.Tensor) -> torch.Tensor:
    """(N, V) logits at the N positions that predict a scored token. A transformer decoder's hidden states go
    through the LM head at those rows only; other causal models (recurrent ones) run their whole forward."""
    if not isinstance(getattr(model, "decoder", None), TransformerStack):
        return model(input_ids, attention_mask=attention_mask).logits[:, :-1][scored]
    hidden = model.decoder(model.embed(input_ids), attention_mask)[:, :-1]
    return model.lm_head(model.scaled(hidden[scored]))


def sequence_logprob(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the summed log-probability of each row's completion given its prompt."""
    return completion_logprobs(model, input_ids, attention_mask, completion_mask).sum(dim=-1)


def _fit(prompt: Sequence[int], completion: Sequence[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Cut a row to max_length: the prompt loses its start (its end leads into the answer), the completion
    its end; the prompt keeps at least half the room when the completion would take it all."""
    prompt, completion = list(prompt), list(completion)
    if max_length is None or len(prompt) + len(completion) <= max_length:
        return prompt, completion
    keep_prompt = min(len(prompt), max(max_length // 2, max_length - len(completion)), max_length - 1)
    keep_prompt = max(keep_prompt, 1)
    return prompt[len(prompt) - keep_prompt:], completion[: max_length - keep_prompt]


def pack_pairs(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int,
               side: str = "right", max_length: int | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows prompt+completion → (input_ids, attention_mask, completion_mask), each (B, T), padded on `side`.

    The completion mask comes from the lengths, so a completion ending in an EOS that equals pad_id keeps that
    EOS. max_length cuts long rows (see `_fit`). Every prompt needs at least one token: the first completion
    token is scored given what precedes it.
    """
    if side not in PAD_SIDES:
        raise UserError(f"padding side '{side}' is not one of: {', '.join(PAD_SIDES)}")
    if len(prompts) != len(completions) or not prompts:
        raise UserError(f"pack_pairs needs as many prompts as completions, at least one; got {len(prompts)} "
                        f"prompts and {len(completions)} completions")
    rows = []
    for number, (prompt, completion) in enumerate(zip(prompts, completions, strict=True), 1):
        if not prompt or not completion:
            empty = "prompt" if not prompt else "completion"
            raise UserError(f"row {number} has an empty {empty} after tokenization; every prompt and completion "
                            "needs at least one token (give the prompt text, or start it with a BOS token)")
        rows.append(_fit(prompt, completion, max_length))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(rows):
        length = len(prompt) + len(completion)
        start = width - length if side == "left" else 0
        input_ids[row, start:start + length] = torch.as_tensor(prompt + completion)
        attention_mask[row, start:start + length] = 1
        completion_mask[row, start + len(prompt):start + length] = 1
    return input_ids, attention_mask, completion_mask
