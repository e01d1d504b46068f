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
        if self.cfg.scale_attention:
            self._gpt2_init()
        else:
            self._t5_init()

    def _gpt2_init(self) -> None:
        """Normal(0, init_std) everywhere, residual projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        for module in self.modules():
            if isinstance(module, nn.Embedding) or (isinstance(module, nn.Linear) and not self._is_tied_head(module)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for block in (m for m in self.modules() if isinstance(m, Block)):
            for attention in (block.attn, block.cross_attn):
                if attention is not None:
                    nn.init.normal_(attention.out.weight, std=residual_std)
            nn.init.normal_(block.mlp.down.weight, std=residual_std)

    def _t5_init(self) -> None:
        """T5's variance-preserving init, for models without the 1/sqrt(d_head) score scaling: unit-variance
        embeddings, Linear weights with std 1/sqrt(fan_in), and queries a further 1/sqrt(d_head) smaller
        (the scaling T5 folds into its initialisation instead of its attention)."""
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1.0)
            elif isinstance(module, nn.Linear) and not self._is_tied_head(module):
                nn.init.normal_(module.weight, std=module.in_features ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        query_std = (self.cfg.d_model * self.cfg.head_dim) ** -0.5
        for block in (m for m in self.modules() if isinstance(m, Block)):
            nn.init.normal_(block.attn.qkv.weight[: self.cfg.n_heads * self.cfg.head_dim], std=query_std)
            if block.cross_attn is not None:
                nn.init.normal_(block.cross_attn.q.weight, std=query_std)

    def tie_weights(self) -> None:
        if self.cfg.tie_embeddings and hasattr(self, "lm_head"):
            self.lm_head.weight = self.embed.weight

    @classmethod
    def for_loading(cls: type[ModelT], cfg: ModelConfig) -> ModelT:
        """A model whose parameters are placeholders on the meta device, built without paying for random
        init; load weights into it with `load_state_dict(..., assign=True)`. Position tables are real."""
        with torch.device("meta"):
            return cls(cfg)

    def _is_tied_head(self, module: nn.Module) -> bool:
        """The tied output head shares the embedding, which the embedding's own init already set."""
        return module is getattr(self, "lm_head", None) and self.cfg.tie_embeddings

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied head is counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def virtual_tokens(self) -> int:
        """Context positions a soft prompt takes in front of every input (0 without one); it sits in the stack
        that reads the input: the encoder where there is one, else the decoder."""
        stack = getattr(self, "encoder", None)
        stack = stack if stack is not None else getattr(self, "decoder", None)
        prompt = getattr(stack, "prompt", None)
        return prompt.length if prompt is not None else 0

    @property
    def token_room(self) -> int:
        """Input tokens that fit in the context: context_length less the soft prompt's virtual tokens."""
        return self.cfg.context_length - self.virtual_tokens

    @property
    def room_text(self) -> str:
        """The context limit as error messages state it, e.g. 'context_length=64 less 20 virtual tokens'."""
        less = f" less {self.virtual_tokens} virtual tokens" if self.virtual_tokens else ""
        return f"context_length={self.cfg.context_length}{less}"

    def scaled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden state as the LM head sees it (T5 scales it by d_model^-0.5 when tied)."""
        return hidden if self.cfg.logits_scale == 1.0 else hidden * self.cfg.logits_scale
