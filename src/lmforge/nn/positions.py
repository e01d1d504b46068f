"""Position information: learned and sinusoidal absolute embeddings, and rotary (RoPE) tables."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The fixed table of "Attention is all you need": sin on even, cos on odd channels.

    Built on the CPU explicitly, so it is real even inside `torch.device("meta")` (CausalLM.for_loading).
    """
    position = torch.arange(length, dtype=torch.float32, device="cpu")[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device="cpu")
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(length, dim), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


class Rotary(nn.Module):
    """cos/sin tables for rotary embeddings in the "rotate half" layout (GPT-NeoX / HF Llama).

    Channel i is paired with channel i + d/2. The sin table is stored with its first half
    negated, so rotating is x*cos + roll(x, d/2)*sin: four ops instead of slice/neg/cat.
    """

    def __init__(self, length: int, head_dim: int, theta: float) -> None:
        super().__init__()
        # Built on the CPU explicitly, so the tables are real even inside torch.device("meta").
        dims = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
        angles = torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), 1.0 / theta ** (dims / head_dim))
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for the given positions, shaped (batch or 1, seq, 1, head_dim) to broadcast over heads."""
        return self.cos[position_ids].unsqueeze(-2).to(dtype), self.sin[position_ids].unsqueeze(-2).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + d/2) of x (batch, seq, heads, head_dim) by their position's angle.

    Equal to x*cos + cat(-x2, x1)*sin with `signed_sin` = cat(-sin, sin) as `Rotary` returns it.
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin
