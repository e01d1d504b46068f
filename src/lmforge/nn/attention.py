"""Multi-head (and grouped-query) self- and cross-attention with a preallocated KV cache.

The fast path is `scaled_dot_product_attention`; `reference_attention` spells out
softmax(QK^T / sqrt(d_k)) V with a -inf upper triangle and is kept as the oracle for tests.
Inside `record_attention()` every attention module takes an explicit path instead of SDPA and keeps its
probabilities, for pictures (`lmforge.inspect`); outside it the only cost is one check of an empty list.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.positions import apply_rotary


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to `max_len`.

    All rows of a batch share one write position: prompts of different lengths are left-padded,
    and the padding is hidden by the attention mask, not by per-row offsets.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, layers: int | None = None) -> None:
        shape = (layers or cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        # Cross-attention keys/values per layer: a function of the encoder output alone, so an
        # encoder-decoder computes them at the first decoding step and reuses them after.
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k/v for `layer` after the filled part; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (called once per forward, after every layer wrote)."""
        self.length += n


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """softmax(QK^T / sqrt(d_k)) V written out; q (B,H,Tq,d), k/v (B,H,Tk,d), mask True = attend."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        tq, tk = q.shape[-2], k.shape[-2]
        future = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class AttentionProbs(NamedTuple):
    """What one attention call saw: the module, probabilities (B, heads, queries, keys) and which cells the
    mask allowed (broadcastable to the probabilities; a masked cell has probability 0)."""

    module: nn.Module
    probs: torch.Tensor
    allowed: torch.Tensor


_RECORDERS: list[list[AttentionProbs]] = []


@contextlib.contextmanager
def record_attention() -> Iterator[list[AttentionProbs]]:
    """Within the block, attention is computed as softmax(QK^T * scale + mask) V explicitly and every call's
    probabilities are appended, in call order, to the list this yields."""
    records: list[AttentionProbs] = []
    _RECORDERS.append(records)
    try:
        yield records
    finally:
        _RECORDERS.remove(records)


def _allowed_cells(mask: torch.Tensor | None, is_causal: bool, tq: int, tk: int, device: torch.device
                   ) -> torch.Tensor:
    """Boolean (…, tq, tk) of the cells attention may use, from SDPA's arguments (is_causal is top-left
    aligned as in SDPA; an additive mask hides a cell with the dtype's minimum)."""
    allowed = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if is_causal:
        allowed = allowed.tril()
    if mask is None:
        return allowed
    return allowed & (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2)


class Attention(nn.Module):
    """Self-attention, causal (decoders) or bidirectional (encoders). q, k and v come from one fused
    projection (one matmul, not three)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        qkv_out = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
        qkv_bias = cfg.attention_bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=qkv_bias)
        self.out = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attention_bias)
        self.dropout, self.causal = cfg.dropout, causal
        self.scale = None if cfg.scale_attention else 1.0  # None = SDPA's 1/sqrt(head_dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,T,d). mask: None for plain causal (or full) attention, else bool (True = attend) or an
        additive float bias, broadcastable to (B, heads, T, T_keys). prefix (2, kv_heads, P, head_dim):
        prefix-tuning keys/values put in front of the cached and current ones; the mask must cover them."""
        batch, seq, _ = x.shape
        heads, kv_heads = self.n_heads, self.n_kv_heads
        # split (not slicing) so that backward is a single cat instead of zero-fill + copy per piece
        qk, v = self.qkv(x).view(batch, seq, heads + 2 * kv_heads, self.head_dim).split(
            [heads + kv_heads, kv_heads], dim=2)
        if rope is not None:
            qk = apply_rotary(qk, *rope)  # queries and keys rotated in one go
        q, k = qk.split([heads, kv_heads], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if prefix is not None:  # learned, never cached: the cache keeps holding real tokens only
            k, v = (torch.cat([p.to(t.dtype).expand(batch, -1, -1, -1), t], dim=2)
                    for p, t in zip(prefix, (k, v), strict=True))
        return self.out(self.attend(q, k, v, mask, is_causal=self.causal and mask is None and seq > 1))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool = False) -> torch.Tensor:
        """SDPA over (B, heads, T, head_dim) tensors → (B, T, heads*head_dim), ready for `out`."""
        if _RECORDERS:
            y = self.attend_explicitly(q, k, v, mask, is_causal)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal,
                scale=self.scale, enable_gqa=self.n_kv_heads != self.n_heads,
            )
        batch, _, seq, _ = q.shape
        return y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)

    def attend_explicitly(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          is_causal: bool) -> torch.Tensor:
        """What SDPA computes, written out so the probabilities can be kept (see `record_attention`)."""
        group = self.n_heads // self.n_kv_heads  # grouped-query: query head h reads key/value head h // group
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-2, -1)) * scale
        allowed = _allowed_cells(mask, is_causal, q.shape[-2], k.shape[-2], q.device)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        for records in _RECORDERS:
            records.append(AttentionProbs(self, probs.detach(), allowed))
        if self.training and self.dropout:
            probs = F.dropout(probs, self.dropout)
        return probs @ v


class CrossAttention(Attention):
    """Decoder queries over the encoder's output ("memory"): q from x, fused k/v from memory."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, causal=False)
        del self.qkv
        qkv_bias = cfg.attention_bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=qkv_bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.kv_heads * cfg.head_dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """x (B,T,d), memory (B,S,d); mask broadcastable to (B, heads, T, S)."""
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        if cache is not None and layer in cache.cross:
            k, v = cache.cross[layer]
        else:
            k, v = self.kv(memory).view(batch, memory.shape[1], 2 * self.n_kv_heads, self.head_dim).transpose(
                1, 2).chunk(2, dim=1)
            if cache is not None:
                cache.cross[layer] = (k, v)
        return self.out(self.attend(q, k, v, mask))
