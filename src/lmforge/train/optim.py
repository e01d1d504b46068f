"""AdamW with weight-decay groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); never decay biases or norm gains (all <2-D)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step where PyTorch supports it for these parameters."""
    groups = param_groups(model, weight_decay)
    device = next(model.parameters()).device
    fused = device.type in ("cuda", "cpu") and all(p.dtype.is_floating_point for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float,
          schedule: str = "cosine") -> float:
    """Linear warmup to `lr`, then cosine or linear decay to min_lr_ratio*lr at total_steps (or flat)."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
