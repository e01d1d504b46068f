"""Reward models: a scalar head on a causal or encoder backbone, trained on preference pairs with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected), and scoring text for PPO / GRPO / best-of-n.

A causal reward model is a `CausalClassifier` (model.head="sequence", num_labels=1) that reads the hidden state
of each row's last real token; an encoder one is a `SequenceClassifier` with one output (CLS or mean pooling).
Both save and load as ordinary checkpoint folders.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.align.logprobs import scoring_mode
from lmforge.checkpoint import load_model_tensors
from lmforge.data.batches import pad_batch
from lmforge.data.preferences import PreferencePair
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import CausalClassifier, Model, SequenceClassifier, build_model, classifier_from
from lmforge.tokenizer import Tokenizer

RewardFn = Callable[[list[str], list[str]], list[float]]
REWARD_LABELS = ["reward"]


def is_reward_model(model: Model) -> bool:
    return isinstance(model, CausalClassifier | SequenceClassifier) and model.cfg.num_labels == 1


def reward_model_from(base: Model, pooling: str = "cls", from_scratch: bool = False) -> Model:
    """A reward model with `base`'s architecture and (unless from_scratch) its backbone weights; the scalar head
    starts fresh. A reward model is returned as it is (to continue training it)."""
    if is_reward_model(base) and not from_scratch:
        return base
    if base.cfg.family == "masked":
        return classifier_from(base, REWARD_LABELS, pooling, from_scratch)
    if base.cfg.family != "causal" or base.cfg.arch != "transformer":
        raise UserError(f"a reward model needs a causal transformer or an encoder backbone; this is a "
                        f"{base.cfg.family} model ({base.cfg.arch})")
    cfg = dataclasses.replace(base.cfg, head="sequence", num_labels=1, labels=REWARD_LABELS)
    model = build_model(cfg)
    if not from_scratch:
        backbone = {k: v for k, v in base.state_dict().items() if k.startswith(("embed.", "decoder."))}
        load_model_tensors(model, {**backbone, **_fresh_head(model)}, "the base model")
    return model


def _fresh_head(model: Model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("classifier.")}


def encode_scored(tokenizer: Tokenizer, model: Model, prompt: str, completion: str, max_length: int) -> list[int]:
    """Token ids a reward model reads for prompt + completion. Long texts lose their start, never their end:
    the completion is what is judged, and a causal head reads the last token. Causal rows end in EOS (when the
    tokenizer has one), so every score is read at the same kind of position; encoder rows get [CLS] ... [SEP]."""
    ids = tokenizer.encode(prompt) + tokenizer.encode(completion)
    if model.cfg.family == "masked":
        head, tail = _encoder_frame(tokenizer)
        room = max_length - len(head) - len(tail)
        return [*head, *ids[max(0, len(ids) - room):], *tail]
    if tokenizer.eos_id is not None:
        ids.append(tokenizer.eos_id)
    return ids[max(0, len(ids) - max_length):]


def _encoder_frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens `Tokenizer.encode_for_encoder` puts around a text: [CLS]/[SEP], else <s>/</s>."""
    if tokenizer.cls_id is not None and tokenizer.sep_id is not None:
        return [tokenizer.cls_id], [tokenizer.sep_id]
    return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]), ([] if tokenizer.eos_id is None
                                                                      else [tokenizer.eos_id])


def pad_id_of(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else 0


class PairBatches:
    """Callable: index -> {"input_ids", "attention_mask"} (2B, T): B chosen rows, then their B rejected rows,
    drawn at random as a pure function of (seed, index); `in_order()` gives every pair once, for evaluation."""

    def __init__(self, chosen: list[list[int]], rejected: list[list[int]], batch_size: int, pad_id: int,
                 seed: int = 0) -> None:
        if len(chosen) != len(rejected) or not chosen:
            raise UserError("reward-model data needs at least one preference pair")
        self.chosen, self.rejected, self.batch_size, self.pad_id, self.seed = chosen, rejected, batch_size, pad_id, seed

    def _batch(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([self.chosen[i] for i in rows] + [self.rejected[i] for i in rows], self.pad_id,
                              side="right")
        return {"input_ids": ids, "attention_mask": mask}

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        return self._batch(rng.integers(0, len(self.chosen), size=self.batch_size).tolist())

    def in_order(self) -> list[dict[str, torch.Tensor]]:
        n = len(self.chosen)
        return [self._batch(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * int(np.mean([len(c) + len(r) for c, r in zip(self.chosen, self.rejected,
                                                                                 strict=True)]))


def encode_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer, model: Model, max_length: int
                 ) -> tuple[list[list[int]], list[list[int]]]:
    return ([encode_scored(tokenizer, model, p.prompt, p.chosen, max_length) for p in pairs],
            [encode_scored(tokenizer, model, p.prompt, p.rejected, max_length) for p in pairs])


def rewards(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 scalar rewards."""
    return model(input_ids, attention_mask=attention_mask).logits[:, 0].float()


def bradley_terry_loss(model: Model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(r_chosen - r_rejected), averaged over the pairs of a PairBatches batch; logs the pair
    accuracy (r_chosen > r_rejected) and the mean margin."""
    chosen, rejected = rewards(model, batch["input_ids"], batch["attention_mask"]).chunk(2)
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    return loss, {"accuracy": (margin > 0).float().mean().detach(), "margin": margin.mean().detach()}


@torch.no_grad()
def pair_metrics(model: Model, batches: PairBatches) -> dict[str, float]:
    """Held-out pair accuracy (ties count as wrong), mean margin and mean Bradley-Terry loss."""
    margins = []
    device = next(model.parameters()).device
    with scoring_mode(model):
        for batch in batches.in_order():
            chosen, rejected = rewards(model, batch["input_ids"].to(device),
                                       batch["attention_mask"].to(device)).chunk(2)
            margins.append((chosen - rejected).cpu())
    margin = torch.cat(margins)
    return {"accuracy": float((margin > 0).float().mean()), "margin": float(margin.mean()),
            "loss": float(-F.logsigmoid(margin).mean()), "pairs": len(margin)}


@torch.no_grad()
def score(model: Model, tokenizer: Tokenizer, prompts: Sequence[str], completions: Sequence[str],
          batch_size: int = 16, max_length: int | None = None) -> list[float]:
    """The reward of each (prompt, completion), in order."""
    if not is_reward_model(model):
        raise UserError("scoring needs a reward model (a sequence head with one output); train one with "
                        "`lmforge align reward`")
    if len(prompts) != len(completions):
        raise UserError(f"got {len(prompts)} prompts but {len(completions)} completions; give one prompt per "
                        "completion")
    max_length = min(max_length or model.token_room, model.token_room)
    rows = [encode_scored(tokenizer, model, p, c, max_length) for p, c in zip(prompts, completions, strict=True)]
    device = next(model.parameters()).device
    out: list[float] = []
    with scoring_mode(model):
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_batch(rows[start:start + batch_size], pad_id_of(tokenizer), device, side="right")
            out += rewards(model, ids, mask).tolist()
    return out


def reward_fn_from_checkpoint(path: str | Path, device: str | torch.device = "cpu", batch_size: int = 16
                              ) -> RewardFn:
    """A reward-model folder as `reward(prompts, completions) -> list[float]`, what PPO and GRPO take."""
    model, tokenizer = load(path, device)
    if tokenizer is None:
        raise UserError(f"'{path}' has no tokenizer.json; a reward model needs its tokenizer to score text")
    if not is_reward_model(model):
        raise UserError(f"'{path}' is not a reward model (a sequence head with one output); train one with "
                        "`lmforge align reward`")

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return score(model, tokenizer, prompts, completions, batch_size)

    return reward
