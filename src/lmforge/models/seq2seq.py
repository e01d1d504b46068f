"""Encoder-decoder (T5, the original transformer): a bidirectional encoder reads the input, a causal
decoder with cross-attention writes the output. Embeddings are shared by both and by a tied head."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.base import IGNORE_INDEX, LMOutput, Model, token_loss
from lmforge.nn import KVCache, TransformerStack


class Seq2SeqLM(Model):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = TransformerStack(cfg, cfg.n_layers, causal=False)
        self.decoder = TransformerStack(cfg, cfg.decoder_layers, causal=True, cross=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.finish_init()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor | None = None,
               cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B,T,vocab) for decoder inputs given the encoder output `memory` and its padding mask."""
        x = self.decoder(self.embed(decoder_input_ids), None, cache, memory, memory_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.scaled(x))

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: the decoder reads the start token then the targets, one step behind."""
        start = labels.new_full((labels.shape[0], 1), self.cfg.decoder_start_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.cfg.decoder_start_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> LMOutput:
        """input_ids/attention_mask: the source; labels (B,T): the target (-100 = padding). Without
        decoder_input_ids they are the labels shifted right (teacher forcing)."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("Seq2SeqLM needs decoder_input_ids or labels")
            decoder_input_ids = self.shift_right(labels)
        memory = self.encode(input_ids, attention_mask)
        logits = self.decode(decoder_input_ids, memory, attention_mask)
        return LMOutput(logits=logits, loss=None if labels is None else token_loss(logits, labels), hidden=memory)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.cfg, batch, max_len, weight.device, weight.dtype, layers=self.cfg.decoder_layers)
