"""Direct Preference Optimization (Rafailov et al. 2023): fit the policy to preference pairs against a frozen
reference, with the implicit reward beta * (log pi(y|x) - log ref(y|x)) and no reward model or sampling.

loss = -(1-eps) log sigmoid(beta * D) - eps log sigmoid(-beta * D),  D = (pi_c - ref_c) - (pi_r - ref_r),
the sigmoid loss with conservative label smoothing eps (cDPO: the label is wrong with probability eps).

The reference log-probs are computed once, before training, with the reference in scoring mode, and cached in
the run folder under a fingerprint of the reference's weights and the encoded data, so a resumed run reuses them
and a changed model or data set never does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lmforge.align.logprobs import pack_pairs, scoring_mode, sequence_logprob
from lmforge.checkpoint import read_safetensors
from lmforge.compress.distill import weights_digest
from lmforge.data.preferences import PreferencePair
from lmforge.errors import UserError
from lmforge.tokenizer import Tokenizer

REFERENCE_FILE = "reference_logps.safetensors"


def check_dpo_options(beta: float, label_smoothing: float) -> None:
    if not beta > 0 or not math.isfinite(beta):
        raise UserError(f"beta={beta} must be a positive number (the KL strength; DPO papers use 0.1 to 0.5)")
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"label_smoothing={label_smoothing} must be in [0, 0.5) (the share of flipped labels)")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean DPO loss over a batch of pairs (each argument (B,) summed completion log-probs), and metrics:
    the implicit rewards beta*(pi - ref) of chosen and rejected, their margin, the implicit-reward accuracy
    (chosen reward > rejected), and the policy's own log-probs and log-prob margin."""
    check_dpo_options(beta, label_smoothing)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {
        "reward_chosen": chosen_reward.mean(), "reward_rejected": rejected_reward.mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        "logp_chosen": policy_chosen_logps.detach().mean(), "logp_rejected": policy_rejected_logps.detach().mean(),
        "logp_margin": (policy_chosen_logps - policy_rejected_logps).detach().mean(),
    }
    return losses.mean(), metrics


@dataclass
class EncodedPairs:
    """Token ids of each pair's prompt and completions (completions end in EOS where the tokenizer has one)."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompts)

    def digest(self) -> str:
        h = hashlib.sha256()
        for rows in (self.prompts, self.chosen, self.rejected):
            h.update(np.asarray([len(r) for r in rows], dtype=np.int64).tobytes())
            h.update(np.asarray([t for r in rows for t in r], dtype=np.int64).tobytes())
        return h.hexdigest()


def encode_preference_pairs(pairs: list[PreferencePair], tokenizer: Tokenizer) -> EncodedPairs:
    """Prompts start with BOS (unless a chat template already wrote it), completions end with EOS, so the
    policy learns where an answer stops."""
    bos_text = tokenizer.specials.get("bos")

    def prompt(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=not (bos_text and text.startswith(bos_text)))

    def completion(text: str) -> list[int]:
        return tokenizer.encode(text, add_eos=True)

    return EncodedPairs([prompt(p.prompt) for p in pairs], [completion(p.chosen) for p in pairs],
                        [completion(p.rejected) for p in pairs])


class DpoBatches:
    """Callable: index -> {"input_ids", "attention_mask", "completion_mask"} (2B, T) — B chosen rows, then the
    same prompts with their rejected completions — plus "ref_chosen"/"ref_rejected" (B,), drawn at random as a
    pure function of (seed, index); `in_order()` yields every pair once."""

    def __init__(self, data: EncodedPairs, reference: torch.Tensor, batch_size: int, pad_id: int,
                 max_length: int, seed: int = 0) -> None:
        if len(data) == 0 or reference.shape != (len(data), 2):
            raise UserError("DPO needs at least one pair and a reference log-prob for each completion")
        self.data, self.reference, self.batch_size, self.pad_id = data, reference, batch_size, pad_id
        self.max_length, self.seed = max_length, seed

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        prompts = [self.data.prompts[i] for i in rows]
        completions = [self.data.chosen[i] for i in rows] + [self.data.rejected[i] for i in rows]
        ids, mask, comp = pack_pairs(prompts + prompts, completions, self.pad_id, "right", self.max_length)
        ref = self.reference[rows]
        return {"input_ids": ids, "attention_mask": mask, "completion_mask": comp,
                "ref_chosen": ref[:, 0], "ref_rejected": ref[:, 1]}

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        return self.batch(rng.integers(0, len(self.data), size=self.batch_size).tolist())

    def in_order(self) -> list[dict[str, torch.Tensor]]:
        n = len(self.data)
        return [self.batch(list(range(i, min(i + self.batch_size, n)))) for i in range(0, n, self.batch_size)]

    @property
    def tokens_per_batch(self) -> int:
        d = self.data
        lengths = [len(p) + (len(c) + len(r)) / 2 for p, c, r in zip(d.prompts, d.chosen, d.rejected, strict=True)]
        return int(2 * self.batch_size * min(float(np.mean(lengths)), self.max_length))


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probs of a DpoBatches batch."""
    return sequence_logprob(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]).chunk(2)


class DpoLoss:
    """The training loop's loss_fn: the policy's log-probs against the batch's cached reference ones."""

    def __init__(self, beta: float, label_smoothing: float = 0.0) -> None:
        check_dpo_options(beta, label_smoothing)
        self.beta, self.label_smoothing = beta, label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = pair_logps(model, batch)
        return dpo_loss(chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], self.beta,
                        self.label_smoothing)


@torch.no_grad()
def reference_logps(reference: nn.Module, data: EncodedPairs, pad_id: int, max_length: int,
                    batch_size: int = 16) -> torch.Tensor:
    """(N, 2) fp32 summed log-probs of each pair's chosen and rejected completion under the reference."""
    placeholder = torch.zeros(len(data), 2)
    batches = DpoBatches(data, placeholder, batch_size, pad_id, max_length)
    device = next(reference.parameters()).device
    out = []
    with scoring_mode(reference):
        for batch in batches.in_order():
            chosen, rejected = pair_logps(reference, {k: v.to(device) for k, v in batch.items()})
            out.append(torch.stack([chosen, rejected], dim=1).cpu())
    return torch.cat(out)


def reference_fingerprint(reference: nn.Module, datasets: dict[str, EncodedPairs], max_length: int) -> str:
    """What cached reference log-probs were computed from: the weights, every encoded pair, the row cut."""
    h = hashlib.sha256(weights_digest(reference).encode())
    h.update(f"max_length={max_length}".encode())
    for name, data in sorted(datasets.items()):
        h.update(f"{name}:{data.digest()}".encode())
    return h.hexdigest()


def cached_reference_logps(folder: Path, fingerprint: str, compute: Callable[[], dict[str, torch.Tensor]]
                           ) -> tuple[dict[str, torch.Tensor], bool]:
    """The reference log-probs stored in folder/REFERENCE_FILE when its fingerprint matches, else computed and
    stored; returns them and whether the cache answered."""
    path = folder / REFERENCE_FILE
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("fingerprint")
        if stored == fingerprint:
            return read_safetensors(path), True
    values = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in values.items()}, str(tmp), metadata={"fingerprint": fingerprint})
    tmp.replace(path)
    return values, False


@torch.no_grad()
def evaluate_dpo(policy: nn.Module, batches: DpoBatches, beta: float, label_smoothing: float = 0.0
                 ) -> dict[str, float]:
    """DPO loss and metrics over every pair of `batches`, the policy in scoring mode."""
    device = next(policy.parameters()).device
    chosen, rejected, ref_c, ref_r = [], [], [], []
    with scoring_mode(policy):
        for batch in batches.in_order():
            c, r = pair_logps(policy, {k: v.to(device) for k, v in batch.items()})
            chosen.append(c.cpu())
            rejected.append(r.cpu())
            ref_c.append(batch["ref_chosen"])
            ref_r.append(batch["ref_rejected"])
    loss, metrics = dpo_loss(torch.cat(chosen), torch.cat(rejected), torch.cat(ref_c), torch.cat(ref_r), beta,
                             label_smoothing)
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}, "pairs": len(batches.data)}


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout rate: DPO's log-ratios compare the policy with a dropout-free reference, and at step
    0 (policy == reference) the loss is then exactly ln 2."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):  # attention's rate, passed to SDPA as a number
            module.dropout = 0.0
