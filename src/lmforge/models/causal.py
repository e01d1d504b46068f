"""Decoder-only language model (GPT-2, Llama and friends are configurations of this one class)."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.base import LMOutput, Model, token_loss
from lmforge.nn import KVCache, TransformerStack


class CausalLM(Model):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.decoder = TransformerStack(cfg, cfg.n_layers, causal=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.finish_init()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False) -> LMOutput:
        """input_ids (B,T); labels (B,T) already aligned with the logits (next tokens), -100 = ignore.

        attention_mask (B, past+T), 1 for real tokens, covers the cached positions too.
        last_only computes logits for the final position only (what decoding needs).
        """
        x = self.decoder(self.embed(input_ids), attention_mask, cache)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.scaled(x))
        return LMOutput(logits=logits, loss=None if labels is None else token_loss(logits, labels))

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache for max_len tokens per row (plus a soft prompt's virtual tokens, which are cached too)."""
        weight = self.embed.weight
        return KVCache(self.cfg, batch, max_len + self.virtual_tokens, weight.device, weight.dtype)


def last_real_index(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B,) column of each row's last real token, for left- and right-padded rows alike (None: the last column)."""
    if attention_mask is None:
        return None
    columns = torch.arange(length, device=attention_mask.device)
    return (attention_mask[:, -length:].long() * (columns + 1)).argmax(dim=-1)


class CausalClassifier(Model):
    """A causal decoder with a sequence head (`head="sequence"`): logits (B, num_labels) read from the hidden
    state of each row's last real token, the only one that has seen the whole text. With num_labels=1 it is a
    reward model. No LM head: it scores text, it does not generate."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.decoder = TransformerStack(cfg, cfg.n_layers, causal=True)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)
        self.finish_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> LMOutput:
        """labels: (B,) class ids (cross-entropy), or (B,) float targets when num_labels=1 (squared error)."""
        hidden = self.decoder(self.embed(input_ids), attention_mask)
        last = last_real_index(attention_mask, hidden.shape[1])
        pooled = hidden[:, -1] if last is None else hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = (torch.nn.functional.mse_loss(logits[:, 0].float(), labels.float()) if self.cfg.num_labels == 1
                    else token_loss(logits, labels))
        return LMOutput(logits=logits, loss=loss, hidden=hidden)
