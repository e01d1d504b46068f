"""Rollouts for RL fine-tuning (PPO, GRPO): sample completions from the policy, then score them.

A completion ends at the first EOS, which it keeps: the EOS is the action "stop here" and its log-prob is
trained like any other token's. That holds when pad == EOS too, since the masks come from lengths
(`pack_pairs`), never from comparing ids with the pad id. Prompts are left-padded for generation and the
rollout rows are left-padded prompt+completion, so each row's real tokens are numbered from its first one.

Rewards are any `reward(prompts, completions) -> list[float]`: a Python callable (`--reward module:function`),
a reward-model checkpoint (`--reward_model`), or a built-in programmatic reward (`BUILTIN_REWARDS`):
- `compiles`: 1 when `compile()` accepts prompt + completion as Python source, else 0;
- `fraction:CHARS`: the fraction of the completion's characters that are among CHARS (0 for an empty one).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lmforge.align.logprobs import pack_pairs
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.models import CausalLM
from lmforge.tokenizer import Tokenizer

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class Rollout:
    """B sampled completions. input_ids/attention_mask/completion_mask are (B, T), left-padded prompt +
    completion; ended (B,) says which completions ended with EOS within the token budget."""

    prompts: list[str]
    completions: list[str]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    ended: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's ids; an empty prompt becomes the BOS token (or id 0), since the first completion token is
    scored given what precedes it."""
    ids = tokenizer.encode(text)
    return ids or [tokenizer.bos_id if tokenizer.bos_id is not None else 0]


def cut_at_eos(tokens: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    """The completion up to and including the first EOS, and whether there was one."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return tokens, False


@torch.no_grad()
def sample_rollout(model: CausalLM, tokenizer: Tokenizer, prompts: list[str], sampling: SamplingConfig) -> Rollout:
    """Sample one completion per prompt (repeat a prompt in the list for several). Decoding uses the
    sampling config as given (PPO/GRPO pass temperature 1, top_k 0, top_p 1: the policy's own distribution,
    which the log-probs of the update assume)."""
    encoded = [encode_prompt(tokenizer, text) for text in prompts]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    steps: list[list[int]] = []  # every step's tokens, finished rows included: EOS is cut from `generate`'s result
    generate(model, encoded, sampling, eos_id=tokenizer.eos_id, pad_id=pad, on_token=lambda t: steps.append(t.tolist()))
    completions, ended = [], []
    for row in range(len(prompts)):
        tokens, stopped = cut_at_eos([step[row] for step in steps], tokenizer.eos_id)
        completions.append(tokens)
        ended.append(stopped)
    input_ids, attention_mask, completion_mask = pack_pairs(encoded, completions, pad, side="left")
    device = model.embed.weight.device
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    return Rollout(list(prompts), texts, input_ids.to(device), attention_mask.to(device),
                   completion_mask.to(device), torch.tensor(ended, device=device))


def score(reward: RewardFn, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """(B,) float32 rewards, checked: one finite number per completion."""
    values = reward(prompts, completions)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as err:
        raise UserError(f"the reward function must return a list of numbers, one per completion; it returned "
                        f"{type(values).__name__} ({err})") from None
    if len(values) != len(completions):
        raise UserError(f"the reward function returned {len(values)} scores for {len(completions)} completions; "
                        "it must return one float per completion")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"the reward function returned {len(bad)} non-finite score(s) (first at completion "
                        f"{bad[0]}: {values[bad[0]]}); every score must be a finite float")
    return torch.tensor(values, dtype=torch.float32)


def compiles(prompts: list[str], completions: list[str]) -> list[float]:
    """1.0 where prompt + completion is valid Python source (what `compile()` accepts), else 0.0."""
    return [float(_compiles(p + c)) for p, c in zip(prompts, completions, strict=True)]


def _compiles(source: str) -> bool:
    try:
        compile(source, "<completion>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
        return False
    return True


def char_fraction(chars: str) -> RewardFn:
    """The fraction of each completion's characters that are among `chars` (0 for an empty completion)."""
    if not chars:
        raise UserError("reward 'fraction:' needs characters after the colon, e.g. fraction:e")
    wanted = set(chars)

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [sum(c in wanted for c in text) / len(text) if text else 0.0 for text in completions]

    return reward


BUILTIN_REWARDS: dict[str, Callable[[str], RewardFn]] = {
    "compiles": lambda argument: compiles,
    "fraction": char_fraction,
}


def resolve_reward(spec: str) -> RewardFn:
    """A reward from its CLI name: a built-in (`compiles`, `fraction:CHARS`) or `module:function`."""
    name, _, argument = spec.partition(":")
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name](argument)
    if not argument:
        raise UserError(f"--reward '{spec}' is unknown; give a built-in ({', '.join(BUILTIN_REWARDS)}) or "
                        "module:function naming a Python function reward(prompts, completions) -> list[float]")
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise UserError(f"--reward '{spec}': cannot import module '{name}' ({err}); check PYTHONPATH") from None
    function = getattr(module, argument, None)
    if not callable(function):
        raise UserError(f"--reward '{spec}': module '{name}' has no function '{argument}'")
    return function


def reward_from(reward: str | RewardFn | None, reward_model: str | None) -> RewardFn:
    """Exactly one of a reward (name or callable) and a reward-model checkpoint."""
    if (reward is None) == (reward_model is None):
        raise UserError("give exactly one of --reward (compiles, fraction:CHARS or module:function) and "
                        "--reward_model CHECKPOINT")
    if reward_model is not None:
        from lmforge.align.reward import reward_fn_from_checkpoint  # a model load: only when asked for

        return reward_fn_from_checkpoint(reward_model)
    return resolve_reward(reward) if isinstance(reward, str) else reward
