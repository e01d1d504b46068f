"""Hugging Face layouts (GPT-2, Llama/Mistral/Qwen2, BERT, T5): config.json and weight-name mapping.

Only name and shape bookkeeping lives here (HF code is never imported). Each architecture is a
*layout*: a list of `Piece`s, each naming the HF tensors one lmforge tensor is made of. lmforge
fuses q/k/v into one `qkv` matrix (k/v into `kv` for cross-attention) and gate/up into one `up`
matrix, and HF GPT-2 stores its Conv1D weights transposed; one table serves loading and saving.
Sits above `models`; nothing below imports it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_TYPES = ("gpt2", "llama", "mistral", "qwen2", "bert", "t5")
HF_ACTIVATIONS = {  # HF activation_function (GPT-2) / hidden_act (BERT) → lmforge mlp
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
HF_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}  # lmforge mlp → HF hidden_act
BERT_HEADS = {"BertModel": "none", "BertForMaskedLM": "lm", "BertForPreTraining": "lm",
              "BertForSequenceClassification": "sequence", "BertForTokenClassification": "token"}
BERT_CLASSES = {"none": "BertModel", "lm": "BertForMaskedLM", "sequence": "BertForSequenceClassification",
                "token": "BertForTokenClassification"}
T5_CLASS = "T5ForConditionalGeneration"
TOKEN_ROLES = ("bos", "eos", "pad")  # config.json's <role>_token_id ↔ ModelConfig.<role>_id
# T5 feed-forward: (gated, dense_act_fn) ↔ lmforge mlp. A gated MLP's gate is wi_0, its linear part wi_1.
T5_MLPS = {(False, "relu"): "relu", (False, "gelu"): "gelu", (False, "gelu_new"): "gelu_tanh",
           (False, "gelu_pytorch_tanh"): "gelu_tanh", (True, "gelu_new"): "geglu",
           (True, "gelu_pytorch_tanh"): "geglu", (True, "silu"): "swiglu"}
T5_FEED_FORWARD = {"relu": ("relu", "relu"), "gelu": ("gelu", "gelu"), "gelu_tanh": ("gelu_new", "gelu_new"),
                   "geglu": ("gated-gelu", "gelu_new"), "swiglu": ("gated-silu", "silu")}


@dataclass(frozen=True)
class Piece:
    """One lmforge tensor as HF stores it: the `theirs` tensors concatenated along dim 0."""

    ours: str
    theirs: tuple[str, ...]
    split: tuple[int, ...] = ()  # row counts of the HF parts when unequal (grouped-query q/k/v)
    transpose: bool = False  # HF GPT-2's Conv1D stores (in, out)
    aliases: tuple[str, ...] = ()  # tied duplicates HF may store: must equal `theirs` (read if it is absent)
    copies: tuple[str, ...] = ()  # duplicates HF needs written too; when loading, read only if `theirs` is absent


def _linear(ours: str, theirs: str | tuple[str, ...], bias: bool, split: tuple[int, ...] = (),
            transpose: bool = False) -> list[Piece]:
    """weight (and bias) of a linear or norm layer; several HF modules fuse into one lmforge module."""
    names = (theirs,) if isinstance(theirs, str) else theirs
    weight = Piece(f"{ours}.weight", tuple(f"{n}.weight" for n in names), split, transpose)
    return [weight, Piece(f"{ours}.bias", tuple(f"{n}.bias" for n in names), split)] if bias else [weight]


def _embed_and_head(cfg: ModelConfig, embed: str, head: str, aliases: tuple[str, ...] = (),
                    copy_head: bool = False) -> list[Piece]:
    """Token embeddings plus the output head: its own tensor when untied, else a duplicate HF may store."""
    if not cfg.tie_embeddings:
        return [Piece("embed.weight", (embed,), aliases=aliases), Piece("lm_head.weight", (head,))]
    if copy_head:
        return [Piece("embed.weight", (embed,), aliases=aliases, copies=(head,))]
    return [Piece("embed.weight", (embed,), aliases=(*aliases, head))]


# -- layouts -----------------------------------------------------------------------------------------


def _gpt2_layout(cfg: ModelConfig) -> list[Piece]:
    pieces = [*_embed_and_head(cfg, "transformer.wte.weight", "lm_head.weight"),
              Piece("decoder.positions.learned.weight", ("transformer.wpe.weight",)),
              *_linear("decoder.final_norm", "transformer.ln_f", True)]
    for i in range(cfg.n_layers):
        b, h = f"decoder.blocks.{i}.", f"transformer.h.{i}."
        pieces += _linear(b + "attn_norm", h + "ln_1", True) + _linear(b + "mlp_norm", h + "ln_2", True)
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                             ("mlp.down", "mlp.c_proj")):
            pieces += _linear(b + ours, h + theirs, True, transpose=True)
    return pieces


def _llama_layout(cfg: ModelConfig) -> list[Piece]:
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    qkv_bias = cfg.attention_bias if cfg.qkv_bias is None else cfg.qkv_bias
    pieces = [*_embed_and_head(cfg, "model.embed_tokens.weight", "lm_head.weight"),
              Piece("decoder.final_norm.weight", ("model.norm.weight",))]
    for i in range(cfg.n_layers):
        b, h = f"decoder.blocks.{i}.", f"model.layers.{i}."
        pieces += _linear(b + "attn.qkv", tuple(f"{h}self_attn.{x}_proj" for x in "qkv"), qkv_bias,
                          split=(q_rows, kv_rows, kv_rows))
        pieces += _linear(b + "attn.out", h + "self_attn.o_proj", cfg.attention_bias)
        pieces += _linear(b + "mlp.up", (h + "mlp.gate_proj", h + "mlp.up_proj"), False)
        pieces += _linear(b + "mlp.down", h + "mlp.down_proj", False)
        pieces += [Piece(b + "attn_norm.weight", (h + "input_layernorm.weight",)),
                   Piece(b + "mlp_norm.weight", (h + "post_attention_layernorm.weight",))]
    return pieces


def _bert_layout(cfg: ModelConfig) -> list[Piece]:
    """BertModel names its modules from the root; the heads' classes put them under `bert.`."""
    p = "" if cfg.head == "none" else "bert."
    e = p + "embeddings."
    word = e + "word_embeddings.weight"
    pieces = _embed_and_head(cfg, word, "cls.predictions.decoder.weight") if cfg.head == "lm" else \
        [Piece("embed.weight", (word,))]
    if cfg.type_vocab_size:
        pieces.append(Piece("token_types.weight", (e + "token_type_embeddings.weight",)))
    pieces += [Piece("encoder.positions.learned.weight", (e + "position_embeddings.weight",)),
               *_linear("encoder.input_norm", e + "LayerNorm", True)]
    for i in range(cfg.n_layers):
        b, h = f"encoder.blocks.{i}.", f"{p}encoder.layer.{i}."
        pieces += _linear(b + "attn.qkv", tuple(f"{h}attention.self.{x}" for x in ("query", "key", "value")), True)
        for ours, theirs in (("attn.out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
                             ("mlp.up", "intermediate.dense"), ("mlp.down", "output.dense"),
                             ("mlp_norm", "output.LayerNorm")):
            pieces += _linear(b + ours, h + theirs, True)
    return pieces + _bert_head_layout(cfg)


def _bert_head_layout(cfg: ModelConfig) -> list[Piece]:
    if cfg.head == "lm":
        # transformers 4 makes cls.predictions.bias the decoder's bias; 5 ties the two only with tied embeddings
        # and else uses decoder.bias. Both are written, equal; loading prefers decoder.bias, as 5 computes.
        return [*_linear("mlm_dense", "cls.predictions.transform.dense", True),
                *_linear("mlm_norm", "cls.predictions.transform.LayerNorm", True),
                Piece("lm_head.bias", ("cls.predictions.decoder.bias",), copies=("cls.predictions.bias",))]
    if cfg.head == "none":
        return []
    pooler = _linear("pooler", "bert.pooler.dense", True) if cfg.head == "sequence" else []
    return pooler + _linear("classifier", "classifier", True)


def _t5_layout(cfg: ModelConfig) -> list[Piece]:
    """T5 keeps one relative-position table per stack, in block 0; an unscaled tied head is written
    out as its own tensor (see `_t5_hf_config`)."""
    embeds = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    pieces = _embed_and_head(cfg, "shared.weight", "lm_head.weight", embeds, copy_head=cfg.logits_scale == 1.0)
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        pieces += [Piece(f"{stack}.positions.relative.weight", (bias,)),
                   Piece(f"{stack}.final_norm.weight", (f"{stack}.final_layer_norm.weight",))]
        for i in range(n_layers):
            pieces += _t5_block(cfg, f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer.", cross=stack == "decoder")
    return pieces


def _t5_block(cfg: ModelConfig, b: str, h: str, cross: bool) -> list[Piece]:
    attn = h + "0.SelfAttention."
    pieces = [Piece(b + "attn_norm.weight", (h + "0.layer_norm.weight",)),
              Piece(b + "attn.qkv.weight", tuple(f"{attn}{x}.weight" for x in "qkv")),
              Piece(b + "attn.out.weight", (attn + "o.weight",))]
    if cross:
        x = h + "1.EncDecAttention."
        pieces += [Piece(b + "cross_norm.weight", (h + "1.layer_norm.weight",)),
                   Piece(b + "cross_attn.q.weight", (x + "q.weight",)),
                   Piece(b + "cross_attn.kv.weight", (x + "k.weight", x + "v.weight")),
                   Piece(b + "cross_attn.out.weight", (x + "o.weight",))]
    ff = f"{h}{2 if cross else 1}."
    wi = ("wi_0", "wi_1") if cfg.gated else ("wi",)
    return [*pieces, Piece(b + "mlp_norm.weight", (ff + "layer_norm.weight",)),
            Piece(b + "mlp.up.weight", tuple(f"{ff}DenseReluDense.{w}.weight" for w in wi)),
            Piece(b + "mlp.down.weight", (ff + "DenseReluDense.wo.weight",))]


def _layout(cfg: ModelConfig) -> list[Piece]:
    if cfg.family == "masked":
        return _bert_layout(cfg)
    if cfg.family == "seq2seq":
        return _t5_layout(cfg)
    return _gpt2_layout(cfg) if architecture_of(cfg) == "gpt2" else _llama_layout(cfg)


# -- weights -----------------------------------------------------------------------------------------


def to_hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge weight names/shapes → HF ones (a tied head is written once, as HF expects)."""
    architecture_of(cfg)  # refuses a config with no exact HF equivalent
    out: dict[str, torch.Tensor] = {}
    for piece in _layout(cfg):
        t = tensors[piece.ours].t() if piece.transpose else tensors[piece.ours]
        parts = t.split(list(piece.split)) if piece.split else t.chunk(len(piece.theirs))
        out.update(zip(piece.theirs, parts, strict=True))
        out.update({name: t.clone() for name in piece.copies})  # safetensors refuses shared storage
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF weights → lmforge names and shapes (the inverse of `to_hf_state_dict`)."""
    return {piece.ours: _gather(hf, piece) for piece in _layout(cfg)}


def hf_weight_names(cfg: ModelConfig) -> set[str]:
    """Every HF weight name the layout reads, tied duplicates included."""
    return {name for piece in _layout(cfg) for name in (*piece.theirs, *piece.aliases, *piece.copies)}


def _gather(hf: dict[str, torch.Tensor], piece: Piece) -> torch.Tensor:
    names = piece.theirs
    if len(names) == 1 and names[0] not in hf:  # a tied tensor may be stored under another of its names only
        names = next(((d,) for d in (*piece.copies, *piece.aliases) if d in hf), names)
    t = torch.cat([_take(hf, n) for n in names]) if len(names) > 1 else _take(hf, names[0])
    for name in piece.aliases:
        if name in hf and name != names[0] and not torch.equal(hf[name], t):
            raise UserError(f"the Hugging Face checkpoint's '{name}' should be a tied copy of '{names[0]}' but "
                            "holds different values")
    return (t.t() if piece.transpose else t).contiguous()


def _take(hf: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in hf:
        raise UserError(f"the Hugging Face checkpoint has no weight '{key}'")
    return hf[key]


def tie_from_weights(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> ModelConfig:
    """Settle `tie_embeddings` from the weights, as transformers 5 does: a head stored apart from the
    embeddings with different values is untied; one left out, or stored as an equal copy, is tied."""
    if cfg.family == "masked" and cfg.head != "lm":
        return cfg
    names = {p.ours: p.theirs[0] for p in _layout(dataclasses.replace(cfg, tie_embeddings=False))}
    head, embed = names["lm_head.weight"], names["embed.weight"]
    tied = head not in hf or (embed in hf and torch.equal(hf[head], hf[embed]))
    return cfg if tied == cfg.tie_embeddings else dataclasses.replace(cfg, tie_embeddings=tied)


# -- lmforge config → HF config ----------------------------------------------------------------------


def architecture_of(cfg: ModelConfig) -> str:
    """Which HF architecture a config maps onto exactly (gpt2, llama, qwen2, bert, t5), or a clear error."""
    if cfg.arch != "transformer":
        raise UserError(f"a model.arch='{cfg.arch}' model has no Hugging Face transformers equivalent; keep it as "
                        "an lmforge checkpoint")
    if cfg.family == "masked":
        return _exactly("bert", "BERT", _bert_mismatches(cfg))
    if cfg.family == "seq2seq":
        return _exactly("t5", "T5", _t5_mismatches(cfg))
    return _causal_architecture(cfg)


def _causal_architecture(cfg: ModelConfig) -> str:
    shape = (cfg.norm, cfg.positions, cfg.mlp, cfg.norm_placement)
    plain = cfg.scale_attention and not cfg.embed_norm and cfg.logits_scale == 1.0
    gpt2_attention = cfg.kv_heads == cfg.n_heads and cfg.n_heads * cfg.head_dim == cfg.d_model \
        and cfg.qkv_bias in (None, True)
    if plain and shape[:2] == ("layernorm", "learned") and cfg.mlp in HF_ACTIVATION_NAMES and shape[3] == "pre" \
            and cfg.attention_bias and cfg.mlp_bias and cfg.norm_bias and gpt2_attention:
        return "gpt2"
    if plain and shape == ("rmsnorm", "rope", "swiglu", "pre") and not cfg.mlp_bias:
        return "qwen2" if cfg.qkv_bias and not cfg.attention_bias else "llama"
    raise UserError("this model has no exact Hugging Face GPT-2 or Llama equivalent "
                    f"(norm={cfg.norm}, positions={cfg.positions}, mlp={cfg.mlp}, norm_placement={cfg.norm_placement}, "
                    f"scale_attention={cfg.scale_attention}, embed_norm={cfg.embed_norm}, "
                    f"logits_scale={cfg.logits_scale})")


def _exactly(name: str, title: str, mismatches: list[str]) -> str:
    if mismatches:
        raise UserError(f"this model has no exact Hugging Face {title} equivalent: {'; '.join(mismatches)}")
    return name


def _mismatches(cfg: ModelConfig, wanted: dict[str, Any]) -> list[str]:
    return [f"{key}={getattr(cfg, key)!r} (needs {value!r})" for key, value in wanted.items()
            if getattr(cfg, key) != value]


def _bert_mismatches(cfg: ModelConfig) -> list[str]:
    found = _mismatches(cfg, dict(norm="layernorm", norm_placement="post", positions="learned", embed_norm=True,
                                  norm_bias=True, attention_bias=True, mlp_bias=True, scale_attention=True,
                                  logits_scale=1.0))
    if cfg.mlp not in HF_ACTIVATION_NAMES:
        found.append(f"mlp={cfg.mlp!r} (needs one of {', '.join(HF_ACTIVATION_NAMES)})")
    if cfg.qkv_bias is False:
        found.append("qkv_bias=False (needs biases on q/k/v)")
    if cfg.kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.d_model:
        found.append(f"n_kv_heads={cfg.n_kv_heads}, d_head={cfg.d_head} (needs n_heads heads of d_model/n_heads)")
    if cfg.type_vocab_size < 1:
        found.append("type_vocab_size=0 (needs >= 1)")
    if cfg.head == "sequence" and cfg.pooling != "cls":
        found.append(f"pooling={cfg.pooling!r} (needs 'cls', BERT's pooler)")
    return found


def _t5_mismatches(cfg: ModelConfig) -> list[str]:
    found = _mismatches(cfg, dict(norm="rmsnorm", norm_placement="pre", positions="relative", embed_norm=False,
                                  attention_bias=False, mlp_bias=False, scale_attention=False))
    if cfg.mlp not in T5_FEED_FORWARD:
        found.append(f"mlp={cfg.mlp!r} (needs one of {', '.join(T5_FEED_FORWARD)})")
    if cfg.qkv_bias or cfg.kv_heads != cfg.n_heads:
        found.append(f"qkv_bias={cfg.qkv_bias}, n_kv_heads={cfg.n_kv_heads} (needs no q/k/v bias, n_heads heads)")
    scaled = math.isclose(cfg.logits_scale, cfg.d_model ** -0.5, rel_tol=1e-6)
    if cfg.logits_scale != 1.0 and not (scaled and cfg.tie_embeddings):
        found.append(f"logits_scale={cfg.logits_scale} with tie_embeddings={cfg.tie_embeddings} "
                     "(needs d_model**-0.5 with tied embeddings, or 1.0)")
    return found


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents for `transformers` (GPT-2, Llama/Qwen2, BERT or T5 class), with the special-token
    ids the source config named (an unset one is left out, so transformers' class default applies as before)."""
    arch = architecture_of(cfg)
    writers = {"gpt2": _gpt2_hf_config, "bert": _bert_hf_config, "t5": _t5_hf_config}
    config = writers[arch](cfg) if arch in writers else _llama_hf_config(cfg, arch)
    return {**config, **{key: value for key, value in hf_token_ids(cfg).items() if value is not None}}


def hf_token_ids(cfg: ModelConfig) -> dict[str, Any]:
    """bos/eos/pad_token_id as config.json names them, from the ids the source config carried (None = unset)."""
    return {f"{role}_token_id": getattr(cfg, f"{role}_id") for role in TOKEN_ROLES}


def _gpt2_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
        "n_inner": cfg.hidden_size, "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": HF_ACTIVATION_NAMES[cfg.mlp],
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
    }


def _llama_hf_config(cfg: ModelConfig, arch: str) -> dict[str, Any]:
    return {
        "model_type": arch, "architectures": [HF_CLASSES[arch]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias, "mlp_bias": False,
        "hidden_act": "silu", "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std,
    }


def _bert_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    config = {
        "model_type": "bert", "architectures": [BERT_CLASSES[cfg.head]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.hidden_size, "hidden_act": HF_ACTIVATION_NAMES[cfg.mlp],
        "max_position_embeddings": cfg.context_length, "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps, "position_embedding_type": "absolute", "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout, "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    if cfg.head in ("sequence", "token"):
        names = cfg.labels or [f"LABEL_{i}" for i in range(cfg.num_labels)]
        config.update(id2label={str(i): name for i, name in enumerate(names)},
                      label2id={name: i for i, name in enumerate(names)})
    return config


def _t5_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """transformers reads tie_word_embeddings=True as "scale the decoder output by d_model**-0.5" (T5 v1.0);
    an unscaled model is written untied, its head stored as a tensor of its own."""
    projection, activation = T5_FEED_FORWARD[cfg.mlp]
    return {
        "model_type": "t5", "architectures": [T5_CLASS], "vocab_size": cfg.vocab_size, "d_model": cfg.d_model,
        "d_kv": cfg.head_dim, "d_ff": cfg.hidden_size, "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance, "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": projection, "dense_act_fn": activation, "is_gated_act": cfg.gated,
        "dropout_rate": cfg.dropout, "tie_word_embeddings": cfg.logits_scale != 1.0, "is_encoder_decoder": True,
        "decoder_start_token_id": cfg.decoder_start_id, "n_positions": cfg.context_length,
    }


def generation_config(cfg: ModelConfig, token_ids: dict[str, int | None]) -> dict[str, Any] | None:
    """generation_config.json for a causal or seq2seq model (transformers' field names), or None."""
    if cfg.family == "masked":
        return None
    config: dict[str, Any] = {name: i for name, i in token_ids.items() if i is not None}
    if cfg.family == "seq2seq":
        config["decoder_start_token_id"] = cfg.decoder_start_id
    return {**config, "transformers_version": "5.0.0"} if config else None


# -- HF config → lmforge config ----------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], weight_names: Iterable[str] = ()) -> ModelConfig:
    """An HF config.json as a ModelConfig; refuses options that change the math. `weight_names` pick
    a BERT head when config.json names no architecture. The special-token ids ride along for `hf_config`."""
    model_type = hf.get("model_type")
    ids = {f"{role}_id": hf.get(f"{role}_token_id") for role in TOKEN_ROLES}
    if model_type == "gpt2":
        return dataclasses.replace(_gpt2_config(hf), **ids)
    if model_type in ("llama", "mistral", "qwen2"):
        return dataclasses.replace(_llama_config(hf, model_type), **ids)
    if model_type == "bert":
        return dataclasses.replace(_bert_config(hf, weight_names), **ids)
    if model_type == "t5":
        return dataclasses.replace(_t5_config(hf), **ids)
    raise UserError(f"model_type '{model_type}' is not supported for causal LMs; supported: "
                    f"{', '.join(SUPPORTED_TYPES[:4])}, plus {SUPPORTED_TYPES[4]} (encoders) and "
                    f"{SUPPORTED_TYPES[5]} (encoder-decoders)")


def _refuse(option: str, value: Any) -> UserError:
    return UserError(f"the Hugging Face config sets {option}={value!r}, which lmforge does not implement; "
                     "loading it anyway would change the model's outputs")


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        raise _refuse("activation_function", activation)
    for option in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(option):
            raise _refuse(option, hf[option])
    if hf.get("scale_attn_weights", True) is False:
        raise _refuse("scale_attn_weights", False)
    return ModelConfig(
        vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", 1024), d_model=hf["n_embd"],
        n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner"), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=HF_ACTIVATIONS[activation], positions="learned",
        tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
    )


def _rope_theta(hf: dict[str, Any]) -> float:
    """rope_theta from either layout (transformers 4: top level; 5: rope_parameters); refuses scaling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise _refuse("rope_scaling.rope_type", rope_type)
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config(hf: dict[str, Any], model_type: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", hf["hidden_act"])
    if hf.get("mlp_bias"):
        raise _refuse("mlp_bias", True)
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise _refuse("head_dim", hf["head_dim"])
    context = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type == "mistral") else None
    if window is not None and window < context:
        context = window  # within one window sliding attention is full attention: exact, and no longer supported
    qwen2 = model_type == "qwen2"
    return ModelConfig(
        vocab_size=hf["vocab_size"], context_length=context, d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"], n_heads=heads, n_kv_heads=hf.get("num_key_value_heads"),
        d_ff=hf["intermediate_size"], norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
        positions="rope", rope_theta=_rope_theta(hf), tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=bool(hf.get("attention_bias", False)) and not qwen2, qkv_bias=True if qwen2 else None,
        mlp_bias=False, norm_bias=False, init_std=hf.get("initializer_range", 0.02),
    )


def _bert_config(hf: dict[str, Any], weight_names: Iterable[str]) -> ModelConfig:
    for option in ("is_decoder", "add_cross_attention"):
        if hf.get(option):
            raise _refuse(option, hf[option])
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise _refuse("position_embedding_type", hf["position_embedding_type"])
    activation = hf.get("hidden_act", "gelu")
    if activation not in HF_ACTIVATIONS:
        raise _refuse("hidden_act", activation)
    head = _bert_head(hf, weight_names)
    labels = _labels(hf) if head in ("sequence", "token") else []
    default_names = [f"LABEL_{i}" for i in range(len(labels))]
    return ModelConfig(
        family="masked", vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 512),
        d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
        d_ff=hf.get("intermediate_size", 3072), norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12),
        norm_placement="post", mlp=HF_ACTIVATIONS[activation], positions="learned",
        type_vocab_size=hf.get("type_vocab_size", 2), embed_norm=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), init_std=hf.get("initializer_range", 0.02),
        head=head, num_labels=len(labels), labels=None if labels == default_names else labels, pooling="cls",
    )


def _bert_head(hf: dict[str, Any], weight_names: Iterable[str]) -> str:
    """The head config.json's `architectures` names, else the one the weights hold."""
    architectures = hf.get("architectures") or []
    if architectures:
        if architectures[0] not in BERT_HEADS:
            raise UserError(f"the Hugging Face config's architecture {architectures[0]} is not supported for bert; "
                            f"supported: {', '.join(BERT_HEADS)}")
        return BERT_HEADS[architectures[0]]
    names = {n.removeprefix("bert.") for n in weight_names}
    if any(n.startswith("cls.predictions.") for n in names):
        return "lm"
    if "classifier.weight" in names:
        return "sequence" if any(n.startswith("pooler.") for n in names) else "token"
    return "none"


def _labels(hf: dict[str, Any]) -> list[str]:
    """Class names in id order, from id2label (JSON keys are strings)."""
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    return [str(id2label[key]) for key in sorted(id2label, key=int)]


def _t5_config(hf: dict[str, Any]) -> ModelConfig:
    """T5 v1.0 (ReLU, tied, scaled head) and v1.1 (gated GELU, untied) and their kin. transformers 5 keeps
    the head scaling in `scale_decoder_outputs`; older configs imply it by tie_word_embeddings."""
    architectures = hf.get("architectures") or [T5_CLASS]
    if architectures[0] != T5_CLASS:
        raise UserError(f"the Hugging Face config's architecture {architectures[0]} is not supported for t5; "
                        f"supported: {T5_CLASS}")
    d_model, heads, layers = hf["d_model"], hf["num_heads"], hf["num_layers"]
    d_kv, decoder_layers = hf.get("d_kv", 64), hf.get("num_decoder_layers") or layers
    scaled = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False)
    start = hf.get("decoder_start_token_id")
    return ModelConfig(
        family="seq2seq", vocab_size=hf["vocab_size"], context_length=hf.get("n_positions") or 512,
        d_model=d_model, n_layers=layers, n_decoder_layers=None if decoder_layers == layers else decoder_layers,
        n_heads=heads, d_head=None if d_kv * heads == d_model else d_kv, d_ff=hf.get("d_ff", 2048), norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_placement="pre", mlp=_t5_mlp(hf), positions="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128), scale_attention=False,
        attention_bias=False, mlp_bias=False, norm_bias=False, tie_embeddings=hf.get("tie_word_embeddings", True),
        logits_scale=d_model ** -0.5 if scaled else 1.0,
        decoder_start_id=start if start is not None else hf.get("pad_token_id") or 0,
    )


def _t5_mlp(hf: dict[str, Any]) -> str:
    """feed_forward_proj ("relu", "gated-gelu", ...) as an lmforge mlp. transformers lets a stored
    is_gated_act / dense_act_fn override what feed_forward_proj says, so a disagreement is refused."""
    projection = hf.get("feed_forward_proj", "relu")
    parts = projection.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    activation = "gelu_new" if projection == "gated-gelu" else parts[-1]  # transformers' backward compatibility
    if hf.get("is_gated_act", gated) != gated:
        raise _refuse("is_gated_act", hf["is_gated_act"])
    if hf.get("dense_act_fn", activation) != activation:
        raise _refuse("dense_act_fn", hf["dense_act_fn"])
    if (gated, activation) not in T5_MLPS or len(parts) > 2:
        raise _refuse("feed_forward_proj", projection)
    return T5_MLPS[(gated, activation)]
