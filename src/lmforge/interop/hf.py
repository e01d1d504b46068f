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


def architecture_of(cfg: ModelConfig) -> str:
    """Which HF architecture a config maps onto exactly, or a clear error."""
    shape = (cfg.norm, cfg.positions, cfg.mlp, cfg.norm_placement)
    biases = (cfg.attention_bias, cfg.mlp_bias)
    if shape == ("layernorm", "learned", "gelu_tanh", "pre") and all(biases) and cfg.kv_heads == cfg.n_heads:
        return "gpt2"
    if shape == ("rmsnorm", "rope", "swiglu", "pre") and not any(biases):
        return "llama"
    raise UserError("this model has no exact Hugging Face GPT-2 or Llama equivalent "
                    f"(norm={cfg.norm}, positions={cfg.positions}, mlp={cfg.mlp}, norm_placement={cfg.norm_placement})")


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json contents for `transformers` (GPT2LMHeadModel or LlamaForCausalLM)."""
    if architecture_of(cfg) == "gpt2":
        return {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
            "n_positions": cfg.context_length, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "n_inner": cfg.hidden_size, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        }
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.hidden_size, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "hidden_act": "silu", "attention_dropout": cfg.dropout, "initializer_range": cfg.init_std,
    }


def to_hf_state_dict(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmforge weight names/shapes → HF ones (a tied head is written once, as HF expects)."""
    out: dict[str, torch.Tensor] = {}
    gpt2 = architecture_of(cfg) == "gpt2"
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            i, rest = parts[1], ".".join(parts[2:])
            out.update(_block_to_hf(i, rest, t, gpt2, q_rows, kv_rows))
        elif name == "embed.weight":
            out["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"] = t
        elif name == "learned_positions.weight":
            out["transformer.wpe.weight"] = t
        elif name.startswith("final_norm."):
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
    if rest == "attn.qkv.weight":
        q, k, v = t.split([q_rows, kv_rows, kv_rows])
        return {prefix + "self_attn.q_proj.weight": q, prefix + "self_attn.k_proj.weight": k,
                prefix + "self_attn.v_proj.weight": v}
    if rest == "mlp.up.weight":
        gate, up = t.chunk(2)
        return {prefix + "mlp.gate_proj.weight": gate, prefix + "mlp.up_proj.weight": up}
    names = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
             "attn.out.weight": "self_attn.o_proj.weight", "mlp.down.weight": "mlp.down_proj.weight"}
    return {prefix + names[rest]: t}


def from_hf_state_dict(cfg: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 / Llama weights → lmforge names and shapes (the inverse of `to_hf_state_dict`)."""
    gpt2 = architecture_of(cfg) == "gpt2"
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layers):
        if gpt2:
            p = f"transformer.h.{i}."
            for ours, theirs, conv in (("attn_norm", "ln_1", False), ("mlp_norm", "ln_2", False),
                                       ("attn.qkv", "attn.c_attn", True), ("attn.out", "attn.c_proj", True),
                                       ("mlp.up", "mlp.c_fc", True), ("mlp.down", "mlp.c_proj", True)):
                out[f"blocks.{i}.{ours}.weight"] = _take(hf, p + theirs + ".weight").t() if conv else \
                    _take(hf, p + theirs + ".weight")
                out[f"blocks.{i}.{ours}.bias"] = _take(hf, p + theirs + ".bias")
        else:
            p = f"model.layers.{i}."
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([_take(hf, p + f"self_attn.{x}_proj.weight") for x in "qkv"])
            out[f"blocks.{i}.attn.out.weight"] = _take(hf, p + "self_attn.o_proj.weight")
            out[f"blocks.{i}.mlp.up.weight"] = torch.cat([_take(hf, p + "mlp.gate_proj.weight"),
                                                          _take(hf, p + "mlp.up_proj.weight")])
            out[f"blocks.{i}.mlp.down.weight"] = _take(hf, p + "mlp.down_proj.weight")
            out[f"blocks.{i}.attn_norm.weight"] = _take(hf, p + "input_layernorm.weight")
            out[f"blocks.{i}.mlp_norm.weight"] = _take(hf, p + "post_attention_layernorm.weight")
    if gpt2:
        out["embed.weight"] = _take(hf, "transformer.wte.weight")
        out["learned_positions.weight"] = _take(hf, "transformer.wpe.weight")
        out["final_norm.weight"] = _take(hf, "transformer.ln_f.weight")
        out["final_norm.bias"] = _take(hf, "transformer.ln_f.bias")
    else:
        out["embed.weight"] = _take(hf, "model.embed_tokens.weight")
        out["final_norm.weight"] = _take(hf, "model.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = _take(hf, "lm_head.weight")
    return {k: v.contiguous() for k, v in out.items()}


def _take(hf: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in hf:
        raise UserError(f"the Hugging Face checkpoint has no weight '{key}'")
    return hf[key]
