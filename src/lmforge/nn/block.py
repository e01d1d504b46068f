"""The residual transformer block, in pre-norm (GPT-2, Llama, T5) or post-norm (original, BERT)
arrangement; decoder blocks of an encoder-decoder add cross-attention between the two."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn.attention import Attention, CrossAttention, KVCache
from lmforge.nn.mlp import MLP
from lmforge.nn.norms import make_norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool = True, cross: bool = False) -> None:
        super().__init__()
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.cross_norm = make_norm(cfg) if cross else None
        self.cross_attn = CrossAttention(cfg) if cross else None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, layer: int = 0,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, rope, mask, cache, layer, prefix))
        if self.cross_attn is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, memory, memory_mask, cache, layer))
        return self._residual(x, self.mlp_norm, self.mlp)

    def _residual(self, x: torch.Tensor, norm: nn.Module, sublayer: Callable[[torch.Tensor], torch.Tensor]
                  ) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop(sublayer(norm(x)))
        return norm(x + self.drop(sublayer(x)))
