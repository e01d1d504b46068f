"""GRPO (Shao et al. 2024, DeepSeekMath): PPO's clipped objective without a value head.

Each rollout samples G completions for each of rollout_batch / G prompts. A completion's advantage is its
score relative to its group, (r − mean_group) / (std_group + eps) (std with Bessel's correction, as the paper's
and trl's), the same for every one of its tokens. The KL to the reference is not folded into the reward as
PPO does; as in DeepSeekMath it is a loss term: β · k3(π, π_ref) per completion token, averaged with the
policy loss over the minibatch's completion tokens (k3 = (r−1) − log r ≥ 0 with r = π_ref/π is recomputed from
the current policy, so its gradient pulls toward the reference). `kl_estimator` picks what is logged as the
rollout's KL; β may be adaptive as in PPO. Same rollouts, same loop, same checkpoints as `lmforge.align.ppo`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.align.kl import kl_per_token
from lmforge.align.logprobs import scoring_mode
from lmforge.align.ppo import (
    Batch,
    Reference,
    RLResult,
    RLSettings,
    RolloutBatches,
    clipped_policy_loss,
    masked_mean,
    policy_outputs,
    run_rl,
)
from lmforge.align.rollout import RewardFn
from lmforge.errors import UserError
from lmforge.models import CausalLM
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig


@dataclass
class GrpoSettings(RLSettings):
    group_size: int = field(default=4, metadata={"help": "completions sampled per prompt (G >= 2)"})
    eps: float = field(default=1e-4, metadata={"help": "added to the group's std before dividing"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size < 2:
            raise UserError(f"group_size={self.group_size} must be >= 2: advantages are relative to the group")
        if self.rollout_batch % self.group_size:
            raise UserError(f"group_size={self.group_size} must divide rollout_batch={self.rollout_batch} "
                            "(rollout_batch / group_size prompts per rollout)")


def group_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(B,) scores of consecutive groups of `group_size` → (r − group mean) / (group std + eps)."""
    groups = scores.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


class GroupBatches(RolloutBatches):
    """Rollouts of G completions per prompt; advantages from the group, no values."""

    with_values = False

    def rollout_prompts(self, rollout: int) -> list[str]:
        s: GrpoSettings = self.settings
        per_prompt = RolloutBatches.rollout_prompts(self, rollout)[: s.rollout_batch // s.group_size]
        return [prompt for prompt in per_prompt for _ in range(s.group_size)]

    def _advantages(self, batch: Batch, scores: torch.Tensor, kl: torch.Tensor, outputs: tuple,
                    beta: float) -> dict[str, torch.Tensor]:
        s: GrpoSettings = self.settings
        advantages = group_advantages(scores, s.group_size, s.eps)[:, None] * batch["mask"]
        return {"advantages": advantages, "beta": torch.full_like(scores, beta)}


def grpo_loss(settings: GrpoSettings) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, dict]]:
    """The loop's loss_fn: clipped policy loss + β · k3 KL to the reference − entropy_coef · entropy."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"]
        with scoring_mode(model):
            logp, entropy = policy_outputs(model, batch, with_values=False)
        policy_loss, clip_frac = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                                     settings.clip)
        kl = masked_mean(kl_per_token(logp, batch["ref_logp"], "k3"), mask)
        mean_entropy = masked_mean(entropy, mask)
        beta = batch["beta"][0]
        loss = policy_loss + beta * kl - settings.entropy_coef * mean_entropy
        return loss, {"policy_loss": policy_loss.detach(), "kl_loss": kl.detach(), "entropy": mean_entropy.detach(),
                      "clip_frac": clip_frac, **batch["stats"]}

    return loss_fn


def grpo(policy: CausalLM, tokenizer: Tokenizer, prompts: list[str], reward: RewardFn, settings: GrpoSettings,
         train_cfg: TrainConfig, *, out_dir: str | Path | None = None, reference: CausalLM | None = None,
         resume: bool = False) -> RLResult:
    """GRPO-train `policy`; arguments and result as `lmforge.align.ppo.ppo` (no value head)."""
    batches = GroupBatches(policy, tokenizer, prompts, reward, settings, Reference(policy, reference))
    return run_rl(policy, batches, grpo_loss(settings), train_cfg, tokenizer, out_dir, resume)
