"""One `ModelConfig` for every architecture lmforge builds, plus named presets.

GPT-2, Llama-style and the tiny test models are presets of the same dataclass; the modules in
`lmforge.nn` read only these fields, so a family differs only where its math differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("gelu", "gelu_tanh", "relu", "relu2", "swiglu", "geglu")
POSITIONS = ("learned", "sinusoidal", "rope", "none")


@dataclass
class ModelConfig:
    """Shape and architecture choices of a transformer language model."""

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = field(default=None, metadata={"help": "grouped-query heads; None = n_heads"})
    d_ff: int | None = field(default=None, metadata={"help": "MLP hidden size; None = 4*d_model (8/3 for gated)"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm"})
    norm_eps: float = 1e-5
    norm_placement: str = field(default="pre", metadata={"help": "pre (GPT-2, Llama) | post (original transformer)"})
    mlp: str = field(default="gelu_tanh", metadata={"help": "gelu | gelu_tanh | relu | relu2 | swiglu | geglu"})
    positions: str = field(default="learned", metadata={"help": "learned | sinusoidal | rope | none"})
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_bias: bool = True
    qkv_bias: bool | None = field(default=None, metadata={"help": "bias on q/k/v only (Qwen2); None = attention_bias"})
    mlp_bias: bool = True
    norm_bias: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def gated(self) -> bool:
        return self.mlp in ("swiglu", "geglu")

    @property
    def hidden_size(self) -> int:
        """MLP hidden width: explicit d_ff, else 4*d (or 2/3 of that, rounded to 64, when gated)."""
        if self.d_ff:
            return self.d_ff
        if self.gated:
            return 64 * ((8 * self.d_model // 3 + 63) // 64)
        return 4 * self.d_model

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"model.{name}={getattr(self, name)} must be a positive integer")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("positions", self.positions, POSITIONS)
        if self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "pick n_heads that divides d_model"
            )
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise UserError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads queries)"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise UserError(f"rotary positions need an even head_dim, got d_model/n_heads={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.d_ff is not None and self.d_ff < 1:
            raise UserError(f"model.d_ff={self.d_ff} must be a positive integer or null")

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown model config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset '{name}'; choose one of: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"model.{name}='{value}' is not supported; choose one of: {', '.join(choices)}")


_GPT2 = dict(norm="layernorm", mlp="gelu_tanh", positions="learned", tie_embeddings=True)
_LLAMA = dict(
    norm="rmsnorm", mlp="swiglu", positions="rope", tie_embeddings=False,
    attention_bias=False, mlp_bias=False, norm_bias=False,
)

PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(_GPT2, vocab_size=50257, context_length=1024, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": dict(_GPT2, vocab_size=50257, context_length=1024, d_model=1024, n_layers=24, n_heads=16),
    "gpt2-large": dict(_GPT2, vocab_size=50257, context_length=1024, d_model=1280, n_layers=36, n_heads=20),
    "llama2-7b": dict(_LLAMA, vocab_size=32000, context_length=4096, d_model=4096, n_layers=32, n_heads=32,
                      d_ff=11008, norm_eps=1e-5),
    "llama3-8b": dict(_LLAMA, vocab_size=128256, context_length=8192, d_model=4096, n_layers=32, n_heads=32,
                      n_kv_heads=8, d_ff=14336, rope_theta=500000.0, norm_eps=1e-5),
    "tinyllama-1.1b": dict(_LLAMA, vocab_size=32000, context_length=2048, d_model=2048, n_layers=22, n_heads=32,
                           n_kv_heads=4, d_ff=5632, norm_eps=1e-5),
    # The original "Attention is all you need" decoder arrangement: post-norm, sinusoidal, ReLU.
    "transformer-base": dict(vocab_size=37000, context_length=512, d_model=512, n_layers=6, n_heads=8,
                             d_ff=2048, norm_placement="post", mlp="relu", positions="sinusoidal"),
    # Small models that train on 2 CPU cores. `tiny-char` is nanoGPT's CPU Shakespeare shape.
    # nanoGPT's model uses the exact (erf) GELU, which is also ~2.5x cheaper than tanh on this CPU.
    "tiny-char": dict(_GPT2, mlp="gelu", vocab_size=65, context_length=64, d_model=128, n_layers=4, n_heads=4),
    "tiny": dict(_GPT2, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4),
    "tiny-llama": dict(_LLAMA, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2),
    # The demo's model: Llama-style, ~1M parameters with a 2k vocabulary, ~10k tokens/s on 2 cores.
    "small": dict(_LLAMA, vocab_size=2048, context_length=128, d_model=128, n_layers=4, n_heads=4,
                  tie_embeddings=True),
}
