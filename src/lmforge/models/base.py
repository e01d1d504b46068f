"""What every model family shares: output type, weight init, tying, meta-device construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.nn import Block

IGNORE_INDEX = -100
ModelT = TypeVar("ModelT", bound="Model")


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled positions (labels == -100 are ignored), computed in fp32."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class Model(nn.Module):
    """Base of CausalLM, the encoders and Seq2SeqLM. Subclasses build their modules, then call
    `finish_init()`; a subclass with an `lm_head` and `embed` ties them when the config says so."""

    cfg: ModelConfig

    def finish_init(self) -> None:
        self.tie_weights()
        self.apply(self._init_weights)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for block in (m for m in self.modules() if isinstance(m, Block)):  # GPT-2: scale residual projections
            for attention in (block.attn, block.cross_attn):
                if attention is not None:
                    nn.init.normal_(attention.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.embed.weight

    @classmethod
    def for_loading(cls: type[ModelT], cfg: ModelConfig) -> ModelT:
        """A model whose parameters are placeholders on the meta device, built without paying for random
        init; load weights into it with `load_state_dict(..., assign=True)`. Position tables are real."""
        with torch.device("meta"):
            return cls(cfg)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def scaled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden state as the LM head sees it (T5 scales it by d_model^-0.5 when tied)."""
        return hidden if self.cfg.logits_scale == 1.0 else hidden * self.cfg.logits_scale
