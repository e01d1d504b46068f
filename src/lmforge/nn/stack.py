"""A stack of blocks with its positions and masks: the decoder of a causal LM, an encoder, or the
decoder of an encoder-decoder. The families in `lmforge.models` are embeddings + stacks + heads."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.nn.attention import KVCache
from lmforge.nn.block import Block
from lmforge.nn.norms import make_norm
from lmforge.nn.positions import Positions


def position_ids_for(attention_mask: torch.Tensor | None, past: int, seq: int, device: torch.device) -> torch.Tensor:
    """Positions of the current `seq` tokens; with left padding each row counts only its real tokens."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


def causal_mask_for(attention_mask: torch.Tensor | None, past: int, seq: int,
                    device: torch.device) -> torch.Tensor | None:
    """Boolean (B,1,seq,past+seq) mask, True = may attend; None when plain causal attention suffices."""
    if attention_mask is None and (past == 0 or seq == 1):
        return None
    keys = past + seq
    causal = torch.ones(seq, keys, dtype=torch.bool, device=device).tril(past)
    if attention_mask is None:
        return causal[None, None]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    # A left-pad query row may see no key at all; let it see everything so softmax stays finite.
    # Its output is never used, and no real token attends to a pad key, so nothing leaks.
    return mask | ~mask.any(dim=-1, keepdim=True)


def padding_mask_for(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean (B,1,1,keys) mask hiding padded keys from every query, or None without padding."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def with_bias(bias: torch.Tensor, mask: torch.Tensor | None, causal: bool, past: int, seq: int) -> torch.Tensor:
    """Fold a boolean mask (and causality, which SDPA can no longer apply itself) into an additive bias."""
    if causal and mask is None:
        mask = torch.ones(seq, past + seq, dtype=torch.bool, device=bias.device).tril(past)[None, None]
    if mask is None:
        return bias
    return bias.masked_fill(~mask, torch.finfo(bias.dtype).min)


def with_prefix(mask: torch.Tensor | None, n: int, causal: bool, past: int, seq: int,
                device: torch.device) -> torch.Tensor | None:
    """Widen a mask (bool or additive bias) so every query also sees `n` prefix keys in front of the others."""
    if mask is None:
        if not causal or seq == 1:
            return None  # every key visible already
        mask = torch.ones(seq, past + seq, dtype=torch.bool, device=device).tril(past)[None, None]
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([fill((*mask.shape[:-1], n), dtype=mask.dtype, device=device), mask], dim=-1)


class TransformerStack(nn.Module):
    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.positions = Positions(cfg, bidirectional=not causal)
        self.input_norm = make_norm(cfg) if cfg.embed_norm else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal, cross) for _ in range(n_layers))
        # Post-norm blocks already end in a norm; pre-norm stacks need one at the top.
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.context_length = cfg.context_length
        # Hooks for parameter-efficient fine-tuning (`lmforge.peft`); None = the plain stack.
        self.prompt: nn.Module | None = None  # soft prompt: virtual tokens in front of the input
        self.prefix: nn.Module | None = None  # prefix tuning: learned keys/values in front of each layer's
        # Recompute each block's activations in backward instead of keeping them (--train.activation_checkpointing).
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: token embeddings (B,T,d). attention_mask (B, past+T): 1 = real token, covering cached
        positions too. memory/memory_mask: the encoder's output and its (B,S) padding mask."""
        past = cache.length if cache is not None else 0
        added = 0
        if self.prompt is not None:  # its positions are dropped from the output again below
            x, attention_mask, added = self.prompt(x, attention_mask, past)
        seq, device = x.shape[1], x.device
        if past + seq > self.context_length and self.positions.relative is None:
            raise ValueError(f"sequence of {past + seq} tokens exceeds the model's "
                             f"context_length={self.context_length}")
        if self.causal:
            positions = position_ids_for(attention_mask, past, seq, device)
            mask = causal_mask_for(attention_mask, past, seq, device)
        else:
            positions = torch.arange(seq, device=device)[None]
            mask = padding_mask_for(attention_mask)
        absolute = self.positions.absolute(positions)
        x = self.drop(self.input_norm(x if absolute is None else x + absolute))
        rope = self.positions.rope(positions, x.dtype)
        bias = self.positions.bias(past, seq, device)
        if bias is not None:
            mask = with_bias(bias.to(x.dtype), mask, self.causal, past, seq)
        cross_mask = padding_mask_for(memory_mask)
        prefixes = None
        if self.prefix is not None:
            prefixes = self.prefix(x.dtype)  # (layers, 2, kv_heads, P, head_dim)
            mask = with_prefix(mask, prefixes.shape[-2], self.causal, past, seq, device)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            args = (x, rope, mask, cache, i, memory, cross_mask, None if prefixes is None else prefixes[i])
            x = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
        if cache is not None:
            cache.advance(seq)
        x = self.final_norm(x)
        return x[:, added:] if added else x
