"""Position-wise feed-forward networks: plain (GELU, ReLU, ReLU^2) and gated (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "relu2": _relu2,
    "swiglu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
}


class MLP(nn.Module):
    """down(act(up(x))) or, when gated, down(act(gate(x)) * up(x)).

    The gated form keeps gate and up in one matrix (`up` has 2*hidden rows, gate first) so the
    block does one input matmul either way.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.gated
        hidden = cfg.hidden_size
        self.up = nn.Linear(cfg.d_model, hidden * (2 if self.gated else 1), bias=cfg.mlp_bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))
