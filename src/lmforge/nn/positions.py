"""Position information: learned and sinusoidal absolute embeddings, rotary (RoPE) tables, and
T5's bucketed relative-position bias; `Positions` puts whichever the config names behind one face."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import ModelConfig


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


def rope_angles(length: int, head_dim: int, theta: float) -> torch.Tensor:
    """(length, head_dim/2) rotation angles: position m turns channel pair i by m·theta^(-2i/head_dim). Built on
    the CPU explicitly, so the tables are real even inside torch.device("meta")."""
    dims = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu")
    return torch.outer(torch.arange(length, dtype=torch.float32, device="cpu"), 1.0 / theta ** (dims / head_dim))


class Rotary(nn.Module):
    """cos/sin tables for rotary embeddings in the "rotate half" layout (GPT-NeoX / HF Llama).

    Channel i is paired with channel i + d/2. The sin table is stored with its first half
    negated, so rotating is x*cos + roll(x, d/2)*sin: four ops instead of slice/neg/cat.
    """

    def __init__(self, length: int, head_dim: int, theta: float) -> None:
        super().__init__()
        angles = rope_angles(length, head_dim, theta)
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


def relative_bucket(distance: torch.Tensor, buckets: int, max_distance: int, bidirectional: bool) -> torch.Tensor:
    """T5's bucket of each key-minus-query distance: exact for small distances, log-spaced up to
    max_distance, one shared bucket beyond. Bidirectional splits buckets between past and future;
    causal (decoder) attention only ever sees the past, so it uses them all for that."""
    bucket = torch.zeros_like(distance)
    if bidirectional:
        buckets //= 2
        bucket = (distance > 0).long() * buckets
        distance = distance.abs()
    else:
        distance = (-distance).clamp(min=0)
    exact = buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (buckets - exact)).long()).clamp(max=buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to attention scores; one table serves every layer."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        self.buckets, self.max_distance, self.bidirectional = (cfg.relative_buckets, cfg.relative_max_distance,
                                                               bidirectional)
        self.weight = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))
        nn.init.normal_(self.weight, std=cfg.init_std)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias (1, heads, queries, keys) for 1-D position tensors."""
        distance = key_positions[None, :] - query_positions[:, None]
        bucket = relative_bucket(distance, self.buckets, self.max_distance, self.bidirectional)
        return self.weight[bucket].permute(2, 0, 1)[None]


class Positions(nn.Module):
    """The config's position scheme: absolute ones are added to the embeddings (`absolute`), rotary
    rotates queries and keys (`rope`), relative adds a bias to the attention scores (`bias`)."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool) -> None:
        super().__init__()
        ctx, kind = cfg.context_length, cfg.positions
        self.learned = nn.Embedding(ctx, cfg.d_model) if kind == "learned" else None
        self.sinusoidal = SinusoidalPositions(ctx, cfg.d_model) if kind == "sinusoidal" else None
        self.rotary = Rotary(ctx, cfg.head_dim, cfg.rope_theta) if kind == "rope" else None
        self.relative = RelativePositionBias(cfg, bidirectional) if kind == "relative" else None

    def absolute(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        if self.learned is not None:
            return self.learned(position_ids)
        return self.sinusoidal(position_ids) if self.sinusoidal is not None else None

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.rotary(position_ids, dtype) if self.rotary is not None else None

    def bias(self, past: int, seq: int, device: torch.device) -> torch.Tensor | None:
        """Relative bias of queries past..past+seq over keys 0..past+seq, or None."""
        if self.relative is None:
            return None
        return self.relative(torch.arange(past, past + seq, device=device), torch.arange(past + seq, device=device))
