"""PPO for language models (Ziegler et al. 2019; Ouyang et al. 2022), run by the one training loop.

One optimizer step = one minibatch. Every `ppo_epochs × minibatches` steps, `RolloutBatches` (the loop's
`batches`) samples `rollout_batch` completions from the policy, scores them, and in scoring mode (dropout off,
no grad) records the old log-probs, the reference's log-probs, the value estimates and the advantages; then it
serves the minibatches of each epoch in a seeded order. `ppo_loss` (the loop's `loss_fn`) computes the
clipped policy and value losses; `KLStep` (the loop's `on_step`) moves an adaptive β after each rollout. The
rollout buffer and β are state_dicts, so `--resume` continues mid-rollout exactly.

Per completion token t the reward is −β·KL_t (`lmforge.align.kl`), plus the scalar score at the last token
(minus `missing_eos_penalty` when the completion never ended). A zero-initialised value head on the policy's
last hidden states gives V; GAE(γ, λ) gives advantages, whitened over the rollout's completion tokens;
returns = advantages + V. The update runs in scoring mode too (dropout off, as trl does), so the first
minibatch's ratio is exactly 1.

The policy is a full model (its reference a frozen copy) or carries a PEFT method such as LoRA (its
reference is the same model under `lmforge.peft.adapters_disabled`: no second copy).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.align.kl import check_beta, check_estimator, kl_controller, kl_per_token
from lmforge.align.logprobs import completion_logprobs, scoring_mode
from lmforge.align.rollout import RewardFn, Rollout, sample_rollout, score
from lmforge.checkpoint import WEIGHTS_FILE, load_model_tensors, read_safetensors
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig
from lmforge.models import CausalLM
from lmforge.nn import TransformerStack
from lmforge.peft import adapters_disabled, method_restorer, method_saver
from lmforge.peft.core import method_of
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, train
from lmforge.train.checkpoint import read_trainer_state

Batch = dict[str, Any]
SWITCHABLE_METHODS = ("lora", "qlora", "prompt", "prefix", "adapter")  # the base stays untouched under these
VALUE_PREFIX = "value_head."  # the value head's tensors, kept in the trainer state (the policy stays a plain model)


@dataclass
class RLSettings:
    """What PPO and GRPO share: rollouts, the clipped objective and the KL term."""

    rollout_batch: int = field(default=16, metadata={"help": "completions sampled per rollout"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout"})
    minibatches: int = field(default=2, metadata={"help": "optimizer steps per pass (divides rollout_batch)"})
    clip: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    beta: float = field(default=0.05, metadata={"help": "KL penalty weight (initial one when adaptive); 0 = off"})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 (log-ratio) | k3 ((r-1) - log r, >= 0)"})
    kl_target: float | None = field(default=None, metadata={
        "help": "adaptive beta: summed KL per completion to hold (Ziegler et al.); unset = fixed beta"})
    kl_horizon: int = field(default=10_000, metadata={"help": "adaptive beta: samples over which it adapts"})
    max_new_tokens: int = field(default=32, metadata={"help": "completion budget per rollout"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (top_k 0, top_p 1)"})
    missing_eos_penalty: float = field(default=0.0, metadata={
        "help": "subtracted from the score of a completion with no EOS within max_new_tokens"})
    entropy_coef: float = field(default=0.0, metadata={"help": "entropy bonus weight in the loss"})
    seed: int = field(default=0, metadata={"help": "seed of prompt order, sampling and minibatch order"})

    def __post_init__(self) -> None:
        check_beta(self.beta)
        check_estimator(self.kl_estimator)
        kl_controller(self.beta, self.kl_target, self.kl_horizon)  # validates target and horizon
        for name in ("rollout_batch", "ppo_epochs", "minibatches", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}={getattr(self, name)} must be >= 1")
        if self.rollout_batch % self.minibatches:
            raise UserError(f"minibatches={self.minibatches} must divide rollout_batch={self.rollout_batch}")
        if not 0 < self.clip < 1:
            raise UserError(f"clip={self.clip} must be in (0, 1) (0.2 is usual)")
        if self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0: RL samples from the policy")

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.minibatches


@dataclass
class PpoSettings(RLSettings):
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    value_clip: float = field(default=0.2, metadata={"help": "value-loss clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    whiten: bool = field(default=True, metadata={"help": "whiten advantages over the rollout's completion tokens"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise UserError(f"gamma={self.gamma} and lam={self.lam} must be in [0, 1]")


# -- the pieces, each testable on its own ----------------------------------------------------------------


class ValueHead(nn.Module):
    """V(s) = w·h + b on the policy's last hidden state; starts at exactly 0 (weight and bias zero)."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValue(nn.Module):
    """The policy and its value head as one module, so the loop's optimizer sees both."""

    def __init__(self, policy: CausalLM) -> None:
        super().__init__()
        if not isinstance(getattr(policy, "decoder", None), TransformerStack):
            raise UserError("PPO's value head reads a transformer decoder's hidden states; this policy has none "
                            "(use align grpo, which needs no value head)")
        self.policy = policy
        self.value_head = ValueHead(policy.cfg.d_model).to(policy.embed.weight.device)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries; 0 elsewhere."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) token rows where `mask` marks each row's contiguous
    completion: δ_t = r_t + γ V_{t+1} − V_t (V after the last token = 0), A_t = δ_t + γλ A_{t+1}.
    Returns (advantages, returns = advantages + values), both 0 outside the mask."""
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        follows = mask[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        next_value = values[:, t + 1] * follows if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * follows
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(B, T): −β·KL at every completion token, plus the row's score at its last completion token."""
    rewards = -beta * kl * mask
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # each row's last completion column
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def policy_outputs(model: nn.Module, batch: Batch, with_values: bool) -> tuple[torch.Tensor, ...]:
    """One forward: (log-probs, entropies[, values]), each (B, T−1) and 0 off the completion tokens.
    Column t is about the token at t+1 (as `completion_logprobs`)."""
    policy = model.policy if isinstance(model, PolicyWithValue) else model
    ids, attention = batch["input_ids"], batch["attention_mask"]
    mask = batch["mask"].bool()
    hidden = policy.decoder(policy.embed(ids), attention)[:, :-1]
    logits = policy.lm_head(policy.scaled(hidden[mask])).float()  # (N, V): completion positions only
    # Picked as `completion_logprobs` does, bit for bit: the KL to an identical reference is then exactly 0.
    normaliser = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, ids[:, 1:][mask][:, None]).squeeze(-1) - normaliser
    log_probs = logits - normaliser[:, None]
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    logp = torch.zeros(mask.shape, device=ids.device).masked_scatter(mask, picked)
    ent = torch.zeros(mask.shape, device=ids.device).masked_scatter(mask, entropy)
    if not with_values:
        return logp, ent
    return logp, ent, model.value_head(hidden) * mask


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate, mean over completion tokens, and the fraction of tokens clipped."""
    ratio = torch.exp(logp - old_logp)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).float()
    return masked_mean(loss, mask), masked_mean(clipped, mask).detach()


def ppo_loss(settings: PpoSettings) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, dict]]:
    """The loop's loss_fn: clipped policy loss + vf_coef · clipped value loss − entropy_coef · entropy."""

    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        mask = batch["mask"]
        with scoring_mode(model):
            logp, entropy, values = policy_outputs(model, batch, with_values=True)
        policy_loss, clip_frac = clipped_policy_loss(logp, batch["old_logp"], batch["advantages"], mask,
                                                     settings.clip)
        old_values, returns = batch["values"], batch["returns"]
        clipped_values = old_values + (values - old_values).clamp(-settings.value_clip, settings.value_clip)
        value_loss = 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
        mean_entropy = masked_mean(entropy, mask)
        loss = policy_loss + settings.vf_coef * value_loss - settings.entropy_coef * mean_entropy
        approx_kl = 0.5 * masked_mean((logp - batch["old_logp"]) ** 2, mask)
        return loss, {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                      "entropy": mean_entropy.detach(), "clip_frac": clip_frac, "approx_kl": approx_kl.detach(),
                      **batch["stats"]}

    return loss_fn


# -- the loop's batches and step hook ----------------------------------------------------------------------


class Reference:
    """Log-probs under the frozen reference: a PEFT policy with its added modules switched off, else a frozen
    copy of the policy as it was when training began."""

    def __init__(self, policy: CausalLM, reference: CausalLM | None = None) -> None:
        method = method_of(policy) or {"method": "full", "options": {}}
        # Switching off only undoes added modules: BitFit, selective or --peft.unfreeze train base weights in place.
        self.shared = (reference is None and method["method"] in SWITCHABLE_METHODS
                       and not method["options"].get("unfreeze"))
        self.policy = policy
        self.model = None if self.shared else (reference or _frozen_copy(policy))

    def switched(self) -> AbstractContextManager:
        return adapters_disabled(self.policy) if self.shared else nullcontext()

    @torch.no_grad()
    def logprobs(self, ids: torch.Tensor, attention: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
        model = self.policy if self.shared else self.model.to(ids.device)
        with scoring_mode(model), self.switched():
            return completion_logprobs(model, ids, attention, completion)


def _frozen_copy(policy: CausalLM) -> CausalLM:
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference


class RolloutBatches:
    """The loop's `batches(i)`: rollout r = i // steps_per_rollout is collected on first use, then minibatch
    i of it (epoch e in a seeded order) is served. Subclasses say how advantages are made (`_advantages`)."""

    with_values = True

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompts: list[str], reward: RewardFn,
                 settings: RLSettings, reference: Reference) -> None:
        if not prompts:
            raise UserError("RL training needs at least one prompt")
        self.model, self.tokenizer, self.prompts, self.reward = model, tokenizer, list(prompts), reward
        self.settings, self.reference = settings, reference
        self.controller = kl_controller(settings.beta, settings.kl_target, settings.kl_horizon)
        self.index = -1  # the rollout in the buffer
        self.buffer: dict[str, torch.Tensor] = {}
        self.stats: dict[str, float] = {}
        self.samples: list[dict[str, Any]] = []

    @property
    def policy(self) -> CausalLM:
        return self.model.policy if isinstance(self.model, PolicyWithValue) else self.model

    def __call__(self, index: int) -> Batch:
        s = self.settings
        rollout, within = divmod(index, s.steps_per_rollout)
        if rollout != self.index:
            self._collect(rollout)
        epoch, part = divmod(within, s.minibatches)
        order = torch.randperm(s.rollout_batch, generator=torch.Generator().manual_seed(
            s.seed * 1_000_003 + rollout * 1009 + epoch))
        size = s.rollout_batch // s.minibatches
        rows = order[part * size:(part + 1) * size].to(self.buffer["input_ids"].device)
        return {**{k: v[rows] for k, v in self.buffer.items()}, "stats": dict(self.stats)}

    def rollout_prompts(self, rollout: int) -> list[str]:
        """rollout_batch prompts, walking through seeded shuffles of the prompt list."""
        n, count = self.settings.rollout_batch, len(self.prompts)
        chosen = []
        for position in range(rollout * n, (rollout + 1) * n):
            lap, offset = divmod(position, count)
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.settings.seed + 7919 * lap))
            chosen.append(self.prompts[int(order[offset])])
        return chosen

    def _sampling(self, rollout: int) -> SamplingConfig:
        s = self.settings
        return SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=0, top_p=1.0,
                              seed=s.seed * 100_003 + rollout)

    @torch.no_grad()
    def _collect(self, rollout: int) -> None:
        with scoring_mode(self.model):
            sampled = sample_rollout(self.policy, self.tokenizer, self.rollout_prompts(rollout),
                                     self._sampling(rollout))
            scores = score(self.reward, sampled.prompts, sampled.completions).to(sampled.input_ids.device)
            penalised = scores - self.settings.missing_eos_penalty * (~sampled.ended).float()
            batch = {"input_ids": sampled.input_ids, "attention_mask": sampled.attention_mask,
                     "mask": (sampled.completion_mask[:, 1:] * sampled.attention_mask[:, :-1]).float()}
            outputs = policy_outputs(self.model, batch, with_values=self.with_values)
            ref_logp = self.reference.logprobs(sampled.input_ids, sampled.attention_mask, sampled.completion_mask)
        mask, beta = batch["mask"], self.controller.value
        kl = kl_per_token(outputs[0], ref_logp, self.settings.kl_estimator) * mask
        batch |= {"old_logp": outputs[0], "ref_logp": ref_logp}
        batch |= self._advantages(batch, penalised, kl, outputs, beta)
        self.buffer, self.index = batch, rollout
        self.stats = {"score": float(scores.mean()), "kl": float(kl.sum(1).mean()), "beta": beta,
                      "completion_length": float(sampled.lengths.float().mean()),
                      "ended": float(sampled.ended.float().mean())}
        self.samples = _samples(sampled, scores)

    def _advantages(self, batch: Batch, scores: torch.Tensor, kl: torch.Tensor, outputs: tuple,
                    beta: float) -> dict[str, torch.Tensor]:
        s: PpoSettings = self.settings
        mask, values = batch["mask"], outputs[2]
        advantages, returns = gae(token_rewards(scores, kl, mask, beta), values, mask, s.gamma, s.lam)
        if s.whiten:
            advantages = whiten(advantages, mask)
        return {"values": values, "advantages": advantages, "returns": returns}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "stats": self.stats, "samples": self.samples,
                "controller": self.controller.state_dict(), **{f"buffer.{k}": v for k, v in self.buffer.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index, self.stats, self.samples = int(state["index"]), dict(state["stats"]), list(state["samples"])
        self.controller.load_state_dict(state["controller"])
        self.buffer = {k[len("buffer."):]: v for k, v in state.items() if k.startswith("buffer.")}


def _samples(rollout: Rollout, scores: torch.Tensor) -> list[dict[str, Any]]:
    return [{"prompt": p, "completion": c, "score": round(float(r), 4)}
            for p, c, r in zip(rollout.prompts, rollout.completions, scores.tolist(), strict=True)]


class KLStep:
    """The loop's `on_step`: after a rollout's last minibatch, an adaptive β moves toward its target KL."""

    def __init__(self, batches: RolloutBatches) -> None:
        self.batches = batches

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step % self.batches.settings.steps_per_rollout == 0 and self.batches.stats:
            self.batches.controller.update(self.batches.stats["kl"], self.batches.settings.rollout_batch)


# -- running it ----------------------------------------------------------------------------------------------


@dataclass
class RLResult:
    policy: CausalLM
    steps: int
    rollouts: int
    stats: dict[str, float]  # the last rollout's
    samples: list[dict[str, Any]]  # the last rollout's prompts, completions and scores
    seconds: float
    checkpoint: Path | None


def run_rl(model: nn.Module, batches: RolloutBatches, loss_fn: Callable, train_cfg: TrainConfig,
           tokenizer: Tokenizer, out_dir: str | Path | None, resume: bool) -> RLResult:
    """The one training loop, with the policy saved as a normal checkpoint (a PEFT policy: its method state)
    and the value head, if any, kept in the trainer state for resume."""
    policy = batches.policy
    result = train(model, batches, train_cfg, loss_fn=loss_fn, out_dir=out_dir, on_step=KLStep(batches),
                   save=_saver(model, policy, tokenizer), restore=_restorer(model, policy), resume=resume)
    rollouts = math.ceil(result.step / batches.settings.steps_per_rollout)
    return RLResult(policy.eval(), result.step, rollouts, dict(batches.stats), list(batches.samples),
                    result.seconds, result.checkpoint)


def _value_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    if not isinstance(model, PolicyWithValue):
        return {}
    return {VALUE_PREFIX + k: v.detach().cpu() for k, v in model.value_head.state_dict().items()}


def _saver(model: nn.Module, policy: CausalLM, tokenizer: Tokenizer) -> Callable[[Path, dict, dict], None]:
    save_policy = method_saver(policy, tokenizer)
    return lambda folder, state, tensors: save_policy(folder, state, {**tensors, **_value_tensors(model)})


def _restorer(model: nn.Module, policy: CausalLM) -> Callable[[Path], None]:
    restore_policy = method_restorer(policy)

    def restore(folder: Path) -> None:
        if restore_policy is not None:
            restore_policy(folder)
        else:
            load_model_tensors(policy, read_safetensors(folder / WEIGHTS_FILE), str(folder))
        if isinstance(model, PolicyWithValue):
            tensors = read_trainer_state(folder)[1]
            model.value_head.load_state_dict({k[len(VALUE_PREFIX):]: v.to(model.value_head.linear.weight.device)
                                              for k, v in tensors.items() if k.startswith(VALUE_PREFIX)})

    return restore


def ppo(policy: CausalLM, tokenizer: Tokenizer, prompts: list[str], reward: RewardFn, settings: PpoSettings,
        train_cfg: TrainConfig, *, out_dir: str | Path | None = None, reference: CausalLM | None = None,
        resume: bool = False) -> RLResult:
    """PPO-train `policy` (full, or with a PEFT method applied) to raise `reward(prompts, completions)` while
    a per-token KL penalty holds it near `reference` (default: the policy as it is now; a PEFT policy: its
    base, under `adapters_disabled`). train_cfg.steps counts minibatch updates (ppo_epochs × minibatches
    per rollout). Metrics go to out_dir/metrics.jsonl, the policy to out_dir/checkpoint."""
    ref = Reference(policy, reference)
    model = PolicyWithValue(policy)
    batches = RolloutBatches(model, tokenizer, prompts, reward, settings, ref)
    return run_rl(model, batches, ppo_loss(settings), train_cfg, tokenizer, out_dir, resume)


def iter_samples(result: RLResult, limit: int = 4) -> Iterator[str]:
    """A few of the last rollout's samples, for printing."""
    for sample in result.samples[:limit]:
        yield f"[{sample['score']:+.3f}] {sample['prompt']!r} -> {sample['completion']!r}"
