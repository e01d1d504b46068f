"""One `ModelConfig` for every architecture lmforge builds, plus named presets.

All three transformer families are configurations of the same dataclass: decoder-only
(`family="causal"`: GPT-2, Llama), encoder-only (`"masked"`: BERT) and encoder-decoder
(`"seq2seq"`: T5, the original transformer). The modules in `lmforge.nn` read only these
fields, so a family differs only where its math differs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.files import read_json_object

NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("gelu", "gelu_tanh", "relu", "relu2", "swiglu", "geglu")
POSITIONS = ("learned", "sinusoidal", "rope", "relative", "none")
FAMILIES = ("causal", "masked", "seq2seq")
ARCHS = ("transformer", "rnn", "lstm", "gru")  # the recurrent ones are causal LMs (models/recurrent.py)
HEADS = ("lm", "none", "sequence", "token")
POOLINGS = ("cls", "mean")


@dataclass
class ModelConfig:
    """Shape and architecture choices of a transformer language model."""

    family: str = field(default="causal", metadata={"help": "causal (decoder) | masked (encoder) | seq2seq"})
    arch: str = field(default="transformer", metadata={
        "help": "transformer | rnn | lstm | gru (recurrent causal LMs: d_model is the hidden size, n_layers the "
                "stacked recurrent layers; attention options are ignored)"})
    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_layers: int = field(default=12, metadata={"help": "blocks (the encoder's, for seq2seq)"})
    n_decoder_layers: int | None = field(default=None, metadata={"help": "seq2seq decoder blocks; None = n_layers"})
    n_heads: int = 12
    d_head: int | None = field(default=None, metadata={"help": "per-head width; None = d_model/n_heads"})
    n_kv_heads: int | None = field(default=None, metadata={"help": "grouped-query heads; None = n_heads"})
    d_ff: int | None = field(default=None, metadata={"help": "MLP hidden size; None = 4*d_model (8/3 for gated)"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm | rmsnorm"})
    norm_eps: float = 1e-5
    norm_placement: str = field(default="pre", metadata={"help": "pre (GPT-2, Llama) | post (original transformer)"})
    mlp: str = field(default="gelu_tanh", metadata={"help": "gelu | gelu_tanh | relu | relu2 | swiglu | geglu"})
    positions: str = field(default="learned", metadata={"help": "learned | sinusoidal | rope | relative | none"})
    rope_theta: float = 10000.0
    relative_buckets: int = field(default=32, metadata={"help": "T5 relative-position buckets"})
    relative_max_distance: int = field(default=128, metadata={"help": "T5: distances beyond this share a bucket"})
    scale_attention: bool = field(default=True, metadata={"help": "divide scores by sqrt(d_head); T5 does not"})
    type_vocab_size: int = field(default=0, metadata={"help": "token-type (segment) embeddings, BERT: 2; 0 = none"})
    embed_norm: bool = field(default=False, metadata={"help": "normalise the summed embeddings (BERT)"})
    tie_embeddings: bool = True
    dropout: float = 0.0
    attention_bias: bool = True
    qkv_bias: bool | None = field(default=None, metadata={"help": "bias on q/k/v only (Qwen2); None = attention_bias"})
    mlp_bias: bool = True
    norm_bias: bool = True
    init_std: float = 0.02
    logits_scale: float = field(default=1.0, metadata={"help": "scale of the final hidden state before the LM head"})
    head: str = field(default="lm", metadata={"help": "lm | none | sequence | token (encoder heads)"})
    num_labels: int = field(default=0, metadata={"help": "classes of a sequence/token classification head"})
    labels: list[str] | None = field(default=None, metadata={"help": "class names, in label-id order"})
    pooling: str = field(default="cls", metadata={"help": "sequence head input: cls (BERT pooler) | mean"})
    decoder_start_id: int = field(default=0, metadata={"help": "seq2seq: first decoder input (T5: pad = 0)"})
    # Special-token ids a Hugging Face config.json names, kept so an export without a tokenizer writes them back
    # (transformers would otherwise fill in its class defaults, e.g. GPT-2's 50256). A tokenizer's ids win.
    bos_id: int | None = field(default=None, metadata={"help": "BOS id from a Hugging Face config; None = unset"})
    eos_id: int | list[int] | None = field(default=None, metadata={
        "help": "EOS id (or ids) from a Hugging Face config; None = unset"})
    pad_id: int | None = field(default=None, metadata={"help": "padding id from a Hugging Face config; None = unset"})

    def __post_init__(self) -> None:
        self.validate()

    # -- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"model.{name}={value!r} must be a positive integer")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _check_choice("mlp", self.mlp, MLPS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("family", self.family, FAMILIES)
        _check_choice("head", self.head, HEADS)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("arch", self.arch, ARCHS)
        self._validate_family()
        if self.arch != "transformer":
            self._validate_recurrent()
        elif self.d_head is None and self.d_model % self.n_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                "pick n_heads that divides d_model, or set model.d_head"
            )
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise UserError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
                "(grouped-query attention shares each key/value head among n_heads/n_kv_heads queries)"
            )
        if self.positions == "rope" and self.head_dim % 2 and self.arch == "transformer":
            raise UserError(f"rotary positions need an even head_dim, got d_model/n_heads={self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.d_ff is not None and self.d_ff < 1:
            raise UserError(f"model.d_ff={self.d_ff} must be a positive integer or null")
        for name in ("bos_id", "eos_id", "pad_id"):
            _check_token_id(name, getattr(self, name), several=name == "eos_id")

    def _validate_family(self) -> None:
        # A causal backbone may carry a sequence head (a reward model reads its last real token's state).
        if self.head != "lm" and self.family != "masked" and not (self.family == "causal" and self.head == "sequence"
                                                              and self.arch == "transformer"):
            raise UserError(f"model.head='{self.head}' needs model.family='masked' (an encoder), or 'sequence' on a "
                            f"causal transformer; the {self.family} family has only an lm head")
        if self.head in ("sequence", "token") and self.num_labels < 1:
            raise UserError(f"model.head='{self.head}' needs model.num_labels >= 1")
        if self.labels is not None and len(self.labels) != self.num_labels:
            raise UserError(f"model.labels has {len(self.labels)} names but model.num_labels={self.num_labels}")
        if self.positions == "relative" and (self.relative_buckets < 2 or self.relative_max_distance < 2):
            raise UserError("relative positions need model.relative_buckets >= 2 and relative_max_distance >= 2")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            raise UserError(f"model.n_decoder_layers={self.n_decoder_layers} must be a positive integer or null")

    def _validate_recurrent(self) -> None:
        """A recurrent LM is a causal decoder with no attention: refuse what only attention could use."""
        if self.family != "causal":
            raise UserError(f"model.arch='{self.arch}' is a causal language model; set model.family='causal' "
                            f"(got '{self.family}') or model.arch='transformer'")
        if self.n_kv_heads is not None or self.d_head is not None:
            option = "n_kv_heads" if self.n_kv_heads is not None else "d_head"
            raise UserError(f"model.{option} is an attention option, which model.arch='{self.arch}' does not have; "
                            "drop it or use model.arch='transformer'")

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
        """Read config.json; any problem in it is one UserError naming the file."""
        fix = "fix it or save the checkpoint again"
        values = read_json_object(path, "model config", fix)
        try:
            return cls.from_dict(values)
        except UserError as exc:
            raise UserError(f"model config '{path}': {exc}") from None
        except (TypeError, ValueError) as exc:  # a field of the wrong type that validation did not name
            raise UserError(f"model config '{path}' has a value of the wrong type ({exc}); {fix}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset '{name}'; choose one of: {', '.join(sorted(PRESETS))}")
        return cls.from_dict({**PRESETS[name], **overrides})


def _check_token_id(name: str, value: Any, several: bool) -> None:
    """None, an integer, or (EOS, as transformers allows) a non-empty list of integers. Not checked against
    vocab_size: shipped configs hold out-of-vocabulary ids (a tiny GPT-2's 50256, -1 for "no padding")."""
    values = value if several and isinstance(value, list) and value else [value]
    if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        kind = "an integer token id or a list of them" if several else "an integer token id"
        raise UserError(f"model.{name}={value!r} must be {kind}, or null")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"model.{name}='{value}' is not supported; choose one of: {', '.join(choices)}")


_GPT2 = dict(norm="layernorm", mlp="gelu_tanh", positions="learned", tie_embeddings=True)
_LLAMA = dict(
    norm="rmsnorm", mlp="swiglu", positions="rope", tie_embeddings=False,
    attention_bias=False, mlp_bias=False, norm_bias=False,
)

_BERT = dict(family="masked", norm="layernorm", norm_eps=1e-12, norm_placement="post", mlp="gelu",
             positions="learned", type_vocab_size=2, embed_norm=True)
_T5 = dict(family="seq2seq", norm="rmsnorm", norm_eps=1e-6, positions="relative", context_length=512,
           scale_attention=False, attention_bias=False, mlp_bias=False, norm_bias=False)

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
    # Encoder-only: BERT (post-norm, exact GELU, segment embeddings, normalised embeddings).
    "bert-base": dict(_BERT, vocab_size=30522, context_length=512, d_model=768, n_layers=12, n_heads=12),
    "minilm-l6": dict(_BERT, vocab_size=30522, context_length=512, d_model=384, n_layers=6, n_heads=12, d_ff=1536),
    # Encoder-decoder: T5 v1.0 (ReLU, tied, scaled head) and v1.1 (gated GELU, untied, d_head decoupled).
    "t5-small": dict(_T5, vocab_size=32128, d_model=512, n_layers=6, n_heads=8, d_ff=2048, mlp="relu",
                     logits_scale=512 ** -0.5),
    "t5-v1_1-small": dict(_T5, vocab_size=32128, d_model=512, n_layers=8, n_heads=6, d_head=64, d_ff=1024,
                          mlp="geglu", tie_embeddings=False),
    # Small models that train on 2 CPU cores. `tiny-char` is nanoGPT's CPU Shakespeare shape.
    # nanoGPT's model uses the exact (erf) GELU, which is also ~2.5x cheaper than tanh on this CPU.
    "tiny-char": dict(_GPT2, mlp="gelu", vocab_size=65, context_length=64, d_model=128, n_layers=4, n_heads=4),
    "tiny": dict(_GPT2, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4),
    "tiny-llama": dict(_LLAMA, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4,
                       n_kv_heads=2),
    "tiny-bert": dict(_BERT, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4),
    "tiny-t5": dict(_T5, vocab_size=256, context_length=64, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                    mlp="relu", logits_scale=64 ** -0.5),
    # The other families at the demo's scale: an encoder for MLM / classification, a T5 for span corruption.
    "small-bert": dict(_BERT, vocab_size=2048, context_length=128, d_model=128, n_layers=4, n_heads=4),
    "small-t5": dict(_T5, vocab_size=2048, context_length=128, d_model=128, n_layers=4, n_heads=4, d_ff=512,
                     mlp="relu", logits_scale=128 ** -0.5),
    # The demo's model: Llama-style, ~1M parameters with a 2k vocabulary, ~10k tokens/s on 2 cores.
    "small": dict(_LLAMA, vocab_size=2048, context_length=128, d_model=128, n_layers=4, n_heads=4,
                  tie_embeddings=True),
}
