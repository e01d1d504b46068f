"""Encoder-only models (BERT and its kin): bidirectional blocks over token (+ segment) embeddings,
with a masked-LM, sequence-classification or token-classification head, or none (embeddings).

`Encoder` is the bare stack and gives mean-pooled sentence embeddings; each head is a subclass
that adds its modules and says how hidden states become logits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config import ModelConfig
from lmforge.data.batches import pad_batch
from lmforge.errors import UserError
from lmforge.models.base import LMOutput, Model, token_loss
from lmforge.nn import TransformerStack, make_norm
from lmforge.nn.mlp import ACTIVATIONS
from lmforge.tokenizer import Tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the real (unpadded) positions' vectors: (B,T,d) → (B,d)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class Encoder(Model):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.encoder = TransformerStack(cfg, cfg.n_layers, causal=False)
        self.build_head(cfg)
        self.finish_init()

    def build_head(self, cfg: ModelConfig) -> None:
        """Subclasses add their head's modules here."""

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Hidden states → logits (None for the bare encoder)."""
        return None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B,T) token ids, 1/0 padding mask and segment ids → (B,T,d) contextual vectors."""
        x = self.embed(input_ids)
        if self.token_types is not None:
            x = x + self.token_types(torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids)
        return self.encoder(x, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> LMOutput:
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        logits = self.head(hidden, attention_mask)
        loss = None if labels is None or logits is None else token_loss(logits, labels)
        return LMOutput(logits=logits, loss=loss, hidden=hidden)

    @torch.inference_mode()
    def embed_sentences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        normalize: bool = True) -> torch.Tensor:
        """Mean-pooled sentence vectors (B,d), L2-normalised by default (as sentence-transformers)."""
        pooled = mean_pool(self.hidden_states(input_ids, attention_mask), attention_mask)
        return F.normalize(pooled, dim=-1) if normalize else pooled


class MaskedLM(Encoder):
    """BERT's MLM head: dense → activation → norm → vocabulary projection (tied) with a bias."""

    def build_head(self, cfg: ModelConfig) -> None:
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_act = ACTIVATIONS["gelu" if cfg.gated else cfg.mlp]
        self.mlm_norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.lm_head(self.mlm_norm(self.mlm_act(self.mlm_dense(hidden))))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                labelled_only: bool = False) -> LMOutput:
        """labelled_only: compute logits only where labels != -100 (the ~15% that carry loss), which
        skips most of the vocabulary projection in training; logits then have shape (N, vocab)."""
        if not labelled_only or labels is None:
            return super().forward(input_ids, attention_mask, token_type_ids, labels)
        hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
        chosen = labels != -100
        logits = self.head(hidden[chosen], None)
        return LMOutput(logits=logits, loss=token_loss(logits, labels[chosen]), hidden=hidden)


class SequenceClassifier(Encoder):
    """One label per sequence, from the first token through BERT's tanh pooler, or from the mean."""

    def build_head(self, cfg: ModelConfig) -> None:
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooling == "cls" else None
        self.classifier_drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        pooled = torch.tanh(self.pooler(hidden[:, 0])) if self.pooler is not None else mean_pool(hidden, attention_mask)
        return self.classifier(self.classifier_drop(pooled))


class TokenClassifier(Encoder):
    """One label per token (NER-style tagging)."""

    def build_head(self, cfg: ModelConfig) -> None:
        self.classifier_drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self.classifier(self.classifier_drop(hidden))


def classifier_from(encoder: Model, labels: list[str], pooling: str = "cls", from_scratch: bool = False
                    ) -> SequenceClassifier:
    """A SequenceClassifier sharing `encoder`'s architecture and (unless from_scratch) its encoder weights;
    the pooler and classifier start fresh. A classifier with the same labels is returned to continue."""
    if encoder.cfg.family != "masked":
        raise UserError(f"classification needs an encoder (masked family); this is a {encoder.cfg.family} model")
    if isinstance(encoder, SequenceClassifier) and encoder.cfg.labels == labels and not from_scratch:
        return encoder
    cfg = dataclasses.replace(encoder.cfg, head="sequence", num_labels=len(labels), labels=labels, pooling=pooling)
    model = SequenceClassifier(cfg)
    if not from_scratch:
        own = model.state_dict()
        fresh = ("pooler.", "classifier.")
        shared = {k: v for k, v in encoder.state_dict().items() if k in own and not k.startswith(fresh)}
        model.load_state_dict(shared, strict=False)
    return model


@torch.no_grad()
def embed_texts(model: Encoder, tokenizer: Tokenizer, texts: list[str], max_length: int = 256,
                batch_size: int = 32, normalize: bool = True) -> torch.Tensor:
    """(len(texts), d) sentence embeddings, computed in batches of right-padded texts."""
    if not isinstance(model, Encoder):
        raise UserError(f"embeddings come from an encoder (masked family); this is a {type(model).__name__}")
    max_length = min(max_length, model.cfg.context_length)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    device = model.embed.weight.device
    chunks = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer.encode_for_encoder(t, max_length) for t in texts[start:start + batch_size]]
        input_ids, mask = pad_batch(ids, pad, device, side="right")
        chunks.append(model.embed_sentences(input_ids, mask, normalize).float().cpu())
    return torch.cat(chunks)
