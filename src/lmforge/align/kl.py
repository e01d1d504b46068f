"""The KL penalty that keeps an RL-tuned policy near its frozen reference: per-token estimators and β.

Per completion token, with log-ratio d = log π(a|s) − log π_ref(a|s) of the sampled token:
- k1 = d: unbiased for KL(π‖π_ref) over samples from π, but a single token's value can be negative;
- k3 = (r − 1) − log r with r = π_ref/π = exp(−d): also unbiased, never negative (log r ≤ r − 1), with
  less variance (Schulman, "Approximating KL divergence", 2020). Both are exactly 0 when π = π_ref.

β is fixed (`FixedKL`) or follows Ziegler et al. (2019)'s proportional controller (`AdaptiveKL`):
    β ← β · (1 + clip((KL − target)/target, −0.2, 0.2) · n/horizon)
after each rollout batch of n samples whose mean summed KL per completion was KL. Both have
state_dict/load_state_dict, so a resumed run continues with the β it had.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lmforge.errors import UserError

ESTIMATORS = ("k1", "k3")


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise UserError(f"kl estimator '{name}' is not one of: {', '.join(ESTIMATORS)} (k1 = log-ratio, "
                        "k3 = (r-1) - log r, never negative)")


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """The per-token KL estimate from the sampled tokens' log-probs under the policy and the reference
    (same shape; positions that are 0 in both, i.e. not completion tokens, give 0)."""
    check_estimator(estimator)
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    # (r - 1) - log r with log r = -log_ratio; expm1 keeps it exact near r = 1 (and exactly 0 at r = 1). log r is
    # capped at 20 (r ~ 5e8) so a token the policy all but ruled out gives a large but finite penalty.
    log_r = (-log_ratio).clamp(max=20.0)
    return torch.expm1(log_r) - log_r


class FixedKL:
    """A constant β."""

    def __init__(self, beta: float) -> None:
        check_beta(beta)
        self.value = float(beta)

    def update(self, kl: float, n_samples: int) -> None:
        """A fixed β ignores the measured KL."""

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["beta"])


class AdaptiveKL(FixedKL):
    """Ziegler et al.'s controller: β moves toward the value that holds the KL near `target`."""

    def __init__(self, beta: float, target: float, horizon: int = 10_000) -> None:
        super().__init__(beta)
        if not target > 0 or not math.isfinite(target):
            raise UserError(f"kl_target={target} must be a positive number (the summed KL per completion to hold)")
        if horizon < 1:
            raise UserError(f"kl_horizon={horizon} must be >= 1 (samples over which beta adapts)")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, kl: float, n_samples: int) -> None:
        error = min(max((kl - self.target) / self.target, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


def check_beta(beta: float) -> None:
    if not beta >= 0 or not math.isfinite(beta):
        raise UserError(f"beta={beta} must be a number >= 0 (the KL penalty's weight; 0 turns it off)")


def kl_controller(beta: float, target: float | None = None, horizon: int = 10_000) -> FixedKL:
    """A fixed β, or an adaptive one when a target KL is given."""
    return FixedKL(beta) if target is None else AdaptiveKL(beta, target, horizon)
