"""Decoder-only language model (GPT-2, Llama and friends are configurations of this one class)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn import Block, KVCache, Rotary, SinusoidalPositions, make_norm

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def position_ids_for(attention_mask: torch.Tensor | None, past: int, seq: int, device: torch.device) -> torch.Tensor:
    """Positions of the current `seq` tokens; with left padding each row counts only its real tokens."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None]
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]


def attention_mask_for(attention_mask: torch.Tensor | None, past: int, seq: int,
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


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        ctx, kind = cfg.context_length, cfg.positions
        self.learned_positions = nn.Embedding(ctx, cfg.d_model) if kind == "learned" else None
        self.sinusoidal = SinusoidalPositions(ctx, cfg.d_model) if kind == "sinusoidal" else None
        self.rotary = Rotary(ctx, cfg.head_dim, cfg.rope_theta) if kind == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        # Post-norm blocks already end in a norm; pre-norm stacks need one before the head.
        self.final_norm = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: scale residual projections by 1/sqrt(2 * layers)
            for proj in (block.attn.out, block.mlp.down):
                nn.init.normal_(proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @classmethod
    def for_loading(cls, cfg: ModelConfig) -> CausalLM:
        """A model whose parameters are placeholders on the meta device, built without paying for random
        init; load weights into it with `load_state_dict(..., assign=True)`. Position tables are real."""
        with torch.device("meta"):
            return cls(cfg)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> LMOutput:
        """input_ids (B,T); labels (B,T) already aligned with the logits (next tokens), -100 = ignore.

        attention_mask (B, past+T), 1 for real tokens, covers the cached positions too.
        last_only computes logits for the final position only (what decoding needs).
        """
        seq = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if past + seq > self.cfg.context_length:
            raise ValueError(
                f"sequence of {past + seq} tokens exceeds the model's context_length={self.cfg.context_length}"
            )
        positions = position_ids_for(attention_mask, past, seq, input_ids.device)
        mask = attention_mask_for(attention_mask, past, seq, input_ids.device)
        x = self.embed(input_ids)
        if self.learned_positions is not None:
            x = x + self.learned_positions(positions)
        elif self.sinusoidal is not None:
            x = x + self.sinusoidal(positions)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(seq)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.final_norm(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return LMOutput(logits=logits, loss=loss)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.cfg, batch, max_len, weight.device, weight.dtype)
