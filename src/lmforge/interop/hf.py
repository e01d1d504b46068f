"""Hugging Face layouts for GPT-2 and Llama-family decoders: config and weight-name mapping.

Only name and shape bookkeeping lives here (HF code is never imported): lmforge fuses q/k/v
into one `qkv` matrix and gate/up into one `up` matrix, and HF GPT-2 stores its Conv1D
weights transposed. Sits above `models`; nothing below imports it.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM"}
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def architecture_of(cfg: ModelConfig) -> str:
    """Which HF architecture a config maps onto exactly, or a clear error."""
    shape = (cfg.norm, cfg.positions, cfg.mlp, cfg.norm_placement)
    biases = (cfg.attention_bias, cfg.mlp_bias)
    gpt2_mlp = cfg.mlp in ("gelu_tanh", "gelu", "relu")
    if shape[:2] == ("layernorm", "learned") and gpt2_mlp and shape[3] == "pre" and all(biases) \
            and cfg.kv_heads == cfg.n_heads and cfg.qkv_bias in (None, True):
        return "gpt2"
    if shape == ("rmsnorm", "rope", "swiglu", "pre") and not cfg.mlp_bias:
        return "qwen2" if cfg.qkv_bias and not cfg.attention_bias else "llama"
    raise UserError("this model has no exact Hugging Face GPT-2 or Llama equivalent "
                    f"(norm={cfg.norm}, positions={cfg.positions}, mlp={cfg.mlp}, norm_placement={cfg.norm_placement})")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents for `transformers` (GPT2LMHeadModel or LlamaForCausalLM)."""
    if architecture_of(cfg) == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_size, "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else cfg.mlp,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        }
    arch = architecture_of(cfg)
    return {
        "model_type": arch, "architectures": [HF_CLASSES[arch]], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias, "mlp_bias": False,
        "hidden_act": "silu", "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std,
    }


def to_hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge weight names/shapes → HF ones (a tied head is written once, as HF expects)."""
    out: dict[str, torch.Tensor] = {}
    gpt2 = architecture_of(cfg) == "gpt2"
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[:2] == ["decoder", "blocks"]:
            i, rest = parts[2], ".".join(parts[3:])
            out.update(_block_to_hf(i, rest, t, gpt2, q_rows, kv_rows))
        elif name == "embed.weight":
            out["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"] = t
        elif name == "decoder.positions.learned.weight":
            out["transformer.wpe.weight"] = t
        elif name.startswith("decoder.final_norm."):
            out[("transformer.ln_f." if gpt2 else "model.norm.") + parts[-1]] = t
        elif name == "lm_head.weight" and not cfg.tie_embeddings:
            out["lm_head.weight"] = t
    return {k: v.contiguous() for k, v in out.items()}


def _block_to_hf(i: str, rest: str, t: torch.Tensor, gpt2: bool, q_rows: int, kv_rows: int) -> dict:
    if gpt2:
        prefix = f"transformer.h.{i}."
        names = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj",
                 "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
        module, kind = rest.rsplit(".", 1)
        is_conv = module not in ("attn_norm", "mlp_norm") and kind == "weight"  # HF Conv1D is (in, out)
        return {prefix + names[module] + "." + kind: t.t() if is_conv else t}
    prefix = f"model.layers.{i}."
    if rest.startswith("attn.qkv."):
        kind = rest.rsplit(".", 1)[1]
        q, k, v = t.split([q_rows, kv_rows, kv_rows])
        return {f"{prefix}self_attn.{name}_proj.{kind}": part for name, part in zip("qkv", (q, k, v), strict=True)}
    if rest == "mlp.up.weight":
        gate, up = t.chunk(2)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "attn.out.weight": "self_attn.o_proj.weight", "attn.out.bias": "self_attn.o_proj.bias",
             "mlp.down.weight": "mlp.down_proj.weight"}
    return {prefix + names[rest]: t}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 / Llama weights → lmforge names and shapes (the inverse of `to_hf_state_dict`)."""
    gpt2 = architecture_of(cfg) == "gpt2"
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        b = f"decoder.blocks.{i}."
        if gpt2:
            p = f"transformer.h.{i}."
            for ours, theirs, conv in (("attn_norm", "ln_1", False), ("mlp_norm", "ln_2", False),
                                       ("attn.qkv", "attn.c_attn", True), ("attn.out", "attn.c_proj", True),
                                       ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
                out[f"{b}{ours}.weight"] = _take(hf, p + theirs + ".weight").t() if conv else \
                    _take(hf, p + theirs + ".weight")
                out[f"{b}{ours}.bias"] = _take(hf, p + theirs + ".bias")
        else:
            p = f"model.layers.{i}."
            out[f"{b}attn.qkv.weight"] = torch.cat([_take(hf, p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            if cfg.attention_bias if cfg.qkv_bias is None else cfg.qkv_bias:
                out[f"{b}attn.qkv.bias"] = torch.cat([_take(hf, p + f"self_attn.{x}_proj.bias") for x in "qkv"])
            out[f"{b}attn.out.weight"] = _take(hf, p + "self_attn.o_proj.weight")
            if cfg.attention_bias:
                out[f"{b}attn.out.bias"] = _take(hf, p + "self_attn.o_proj.bias")
            out[f"{b}mlp.up.weight"] = torch.cat([_take(hf, p + "mlp.gate_proj.weight"),
                                                          _take(hf, p + "mlp.up_proj.weight")])
            out[f"{b}mlp.down.weight"] = _take(hf, p + "mlp.down_proj.weight")
            out[f"{b}attn_norm.weight"] = _take(hf, p + "input_layernorm.weight")
            out[f"{b}mlp_norm.weight"] = _take(hf, p + "post_attention_layernorm.weight")
    if gpt2:
        out["embed.weight"] = _take(hf, "transformer.wte.weight")
        out["decoder.positions.learned.weight"] = _take(hf, "transformer.wpe.weight")
        out["decoder.final_norm.weight"] = _take(hf, "transformer.ln_f.weight")
        out["decoder.final_norm.bias"] = _take(hf, "transformer.ln_f.bias")
    else:
        out["embed.weight"] = _take(hf, "model.embed_tokens.weight")
        out["decoder.final_norm.weight"] = _take(hf, "model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _take(hf, "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def _take(hf: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in hf:
        raise UserError(f"the Hugging Face checkpoint has no weight '{key}'")
    return hf[key]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """An HF config.json (gpt2, llama, mistral, qwen2) as a ModelConfig; refuses options that change the math."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type in ("llama", "mistral", "qwen2"):
        return _llama_config(hf, model_type)
    raise UserError(f"model_type '{model_type}' is not supported for causal LMs; supported: {', '.join(HF_CLASSES)}")


def _refuse(option: str, value: Any) -> UserError:
    return UserError(f"the Hugging Face config sets {option}={value!r}, which lmforge does not implement; "
                     "loading it anyway would change the model's outputs")


def _gpt2_config(hf: dict[str, Any]) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_ACTIVATIONS:
        raise _refuse("activation_function", activation)
    for option in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(option):
            raise _refuse(option, hf[option])
    if hf.get("scale_attn_weights", True) is False:
        raise _refuse("scale_attn_weights", False)
    return ModelConfig(
        vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", 1024), d_model=hf["n_embd"],
        n_layers=hf["n_layer"], n_heads=hf["n_head"], d_ff=hf.get("n_inner"), norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp=GPT2_ACTIVATIONS[activation], positions="learned",
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
