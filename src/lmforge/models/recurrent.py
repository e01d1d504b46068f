"""Recurrent language models (Elman RNN, LSTM, GRU): what language modelling looked like before attention.

`RecurrentLM` is a causal LM — same inputs, labels, `LMOutput`, cache protocol and checkpoint format as the
transformer `CausalLM` it subclasses — so pretrain, generate, evaluate and serve's one-request path take it
unchanged. It is embed → dropout → torch's nn.RNN / nn.LSTM / nn.GRU (n_layers stacked, hidden size d_model;
cuDNN on a GPU) → dropout → LM head (tied to the embedding when cfg.tie_embeddings, which works because the
hidden size equals the embedding size).

The "cache" of a recurrent model is its hidden state: O(1) memory per row however long the text, which is the
whole point of the architecture and also its weakness (everything the model remembers must fit in d_model
numbers). A padded position (attention_mask 0) leaves the state untouched, so a left-padded row in a batch ends
in exactly the state it would have alone.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.base import LMOutput, Model, token_loss
from lmforge.models.causal import CausalLM

RNN_CLASSES: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
State = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class RecurrentCache:
    """The hidden state carried from one forward to the next (None until the first call: zeros).
    `length` counts the tokens read, as a KVCache does, for callers that track positions."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.state: State | None = None
        self.length = 0


class RecurrentLM(CausalLM):
    """A causal LM whose decoder is a stack of recurrent layers instead of transformer blocks."""

    def __init__(self, cfg: ModelConfig) -> None:
        if cfg.arch not in RNN_CLASSES:
            raise ValueError(f"RecurrentLM needs arch rnn | lstm | gru, got {cfg.arch!r}")
        Model.__init__(self)  # not CausalLM's: it would build the transformer stack
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        between = cfg.dropout if cfg.n_layers > 1 else 0.0  # torch applies it between stacked layers only
        self.rnn = RNN_CLASSES[cfg.arch](cfg.d_model, cfg.d_model, cfg.n_layers, batch_first=True, dropout=between)
        self.drop = nn.Dropout(cfg.dropout)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.finish_init()

    def finish_init(self) -> None:
        """Unit-norm embedding rows (a recurrent layer's input scale matters: its gates saturate or starve), and
        torch's own uniform(±1/sqrt(d)) init for the recurrent weights, which it picks for exactly these layers."""
        self.tie_weights()
        nn.init.normal_(self.embed.weight, std=self.cfg.d_model ** -0.5)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.cfg.d_model ** -0.5)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: RecurrentCache | None = None,
                last_only: bool = False) -> LMOutput:
        """As CausalLM.forward. attention_mask (B, past+T) may cover earlier calls' tokens; only its last T
        columns matter here, since the past is already folded into the cached state."""
        x = self.drop(self.embed(input_ids))
        state = cache.state if cache is not None else None
        mask = None if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
        if mask is None or bool(mask.all()):
            x, state = self.rnn(x, state)
        else:
            x, state = self._masked_run(x, mask, state)
        if cache is not None:
            cache.state, cache.length = state, cache.length + input_ids.shape[1]
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.drop(x))
        return LMOutput(logits=logits, loss=None if labels is None else token_loss(logits, labels))

    def _masked_run(self, x: torch.Tensor, mask: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """Step by step, keeping the previous state wherever the mask is 0: padding never enters the state,
        wherever it sits (left padding in generation, right padding in scoring)."""
        if state is None:
            zeros = x.new_zeros(self.cfg.n_layers, x.shape[0], self.cfg.d_model)
            state = (zeros, zeros.clone()) if isinstance(self.rnn, nn.LSTM) else zeros
        outputs = []
        for t in range(x.shape[1]):
            out, new = self.rnn(x[:, t:t + 1], state)
            keep = mask[:, t].bool()
            state = _where(keep, new, state)
            outputs.append(out)
        return torch.cat(outputs, dim=1), state

    def new_cache(self, batch: int, max_len: int) -> RecurrentCache:
        """The recurrent state: its size does not depend on max_len (kept for CausalLM's signature)."""
        return RecurrentCache(batch)


def _where(keep: torch.Tensor, new: State, old: State) -> State:
    """new where keep (per batch row), else old; states are (layers, B, d) or an LSTM's (h, c) pair."""
    if isinstance(new, tuple):
        return tuple(_where(keep, n, o) for n, o in zip(new, old, strict=True))  # type: ignore[return-value]
    return torch.where(keep[None, :, None], new, old)


def recurrent_parameters(cfg: ModelConfig) -> int:
    """Parameter count of a RecurrentLM with this config, without building it (for sizing against a transformer):
    gates x (input weights + recurrent weights + two biases) per layer, the embedding, and an untied head."""
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[cfg.arch]
    d = cfg.d_model
    layers = cfg.n_layers * gates * (2 * d * d + 2 * d)
    return layers + cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
