"""Reading and writing Hugging Face model folders, and `load` for either layout.

An HF folder is config.json (with `model_type`) + model.safetensors, or a sharded
model.safetensors.index.json, or pytorch_model.bin (read with torch.load(weights_only=True),
never a full unpickle), plus tokenizer.json / tokenizer_config.json when present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.checkpoint import CONFIG_FILE, load_model_tensors, model_tensors, write_atomically
from lmforge.checkpoint import load as load_lmforge
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.interop.hf import (
    config_from_hf,
    from_hf_state_dict,
    generation_config,
    hf_config,
    hf_token_ids,
    hf_weight_names,
    tie_from_weights,
    to_hf_state_dict,
)
from lmforge.models import Model, model_class
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

# Buffers some HF checkpoints store that are not weights (GPT-2's causal masks, old rotary tables,
# BERT's position and token-type id ranges).
_NON_WEIGHTS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq", "embeddings.position_ids",
                "embeddings.token_type_ids")
# Weights HF checkpoints carry that the lmforge model knowingly does without: BERT's next-sentence head
# (BertForPreTraining) and a cross-attention position table old T5 checkpoints store but T5 never uses.
_UNUSED = ("cls.seq_relationship.", "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.")
_BERT_BODY = ("embeddings.", "encoder.", "pooler.")
GENERATION_FILE = "generation_config.json"
TOKENIZER_EXTRAS = ("special_tokens_map.json", "chat_template.jinja", GENERATION_FILE)


def is_hf_folder(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and "model_type" in json.loads(config.read_text())


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, from safetensors (single or sharded) or weights-only .bin files."""
    for index_name, reader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in reader(str(folder / shard)).items()}
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(str(folder / "pytorch_model.bin"))
    raise UserError(f"'{folder}' has a config.json but no model.safetensors, sharded index or pytorch_model.bin")


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _normalise_keys(hf: dict[str, torch.Tensor], cfg: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    weights = {k: v for k, v in hf.items() if not k.endswith(_NON_WEIGHTS) and not k.startswith(_UNUSED)}
    if model_type == "gpt2" and not any(k.startswith("transformer.") for k in weights):
        weights = {k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in weights.items()}
    return _bert_keys(weights, cfg.head) if model_type == "bert" else weights


def _bert_keys(weights: dict[str, torch.Tensor], head: str) -> dict[str, torch.Tensor]:
    """BERT keys as the head's class names them: BertModel has no `bert.` prefix, the heads do. Drops
    the pooler unless the sequence head uses it (BertModel and BertForPreTraining store one)."""
    out = {}
    for key, tensor in weights.items():
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        bare = key.removeprefix("bert.")
        if bare.startswith("pooler.") and head != "sequence":
            continue
        out[("" if head == "none" else "bert.") + bare if bare.startswith(_BERT_BODY) else key] = tensor
    return out


def load_hf(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Model, Tokenizer | None]:
    """Load an HF GPT-2 / Llama / Mistral / Qwen2 / BERT / T5 folder into the lmforge model class it
    describes (no HF code involved)."""
    folder = Path(folder)
    hf_cfg = json.loads((folder / CONFIG_FILE).read_text())
    raw = read_hf_weights(folder)
    cfg = config_from_hf(hf_cfg, raw)
    weights = _normalise_keys(raw, cfg, hf_cfg["model_type"])
    cfg = tie_from_weights(cfg, weights)
    ours = from_hf_state_dict(cfg, weights)
    leftover = sorted(set(weights) - hf_weight_names(cfg))
    if leftover:
        raise UserError(f"'{folder}' has weights lmforge would ignore: {leftover[:5]}; the config and weights disagree")
    model = model_class(cfg).for_loading(cfg)
    load_model_tensors(model, {k: v.float() for k, v in ours.items()}, str(folder), assign=True)
    tokenizer = Tokenizer.load(folder) if (folder / TOKENIZER_FILE).is_file() else None
    return model.to(device).eval(), tokenizer


def save_hf(folder: str | Path, model: Model, tokenizer: Tokenizer | None = None,
            tokenizer_source: str | Path | None = None) -> None:
    """Write an HF folder `transformers` loads (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModel or
    the BERT head's class) with the same outputs; plus generation_config.json for models that generate."""
    config = hf_config(model.cfg)  # with the special-token ids the source config named
    config.update(torch_dtype="float32", transformers_version="5.0.0")
    if tokenizer is not None:  # the tokenizer's ids win; a role it has no token for keeps the source config's id
        for key, source_id in hf_token_ids(model.cfg).items():
            tokenizer_id = getattr(tokenizer, key.removesuffix("_token_id") + "_id")
            config[key] = source_id if tokenizer_id is None else tokenizer_id
    generation = generation_config(model.cfg, {key: config.get(key) for key in hf_token_ids(model.cfg)})

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(to_hf_state_dict(model.cfg, model_tensors(model)), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if generation is not None:
            (tmp / GENERATION_FILE).write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for extra in TOKENIZER_EXTRAS if tokenizer_source else ():  # the source's own generation config wins
            if (Path(tokenizer_source) / extra).is_file():
                shutil.copy2(Path(tokenizer_source) / extra, tmp / extra)

    write_atomically(Path(folder), write)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Model, Tokenizer | None]:
    """Load a model folder in either layout: lmforge checkpoint or Hugging Face."""
    if not Path(path).is_dir():
        raise UserError(f"'{path}' is not a folder; pass a checkpoint folder or a Hugging Face model folder")
    if is_hf_folder(path):
        return load_hf(path, device)
    return load_lmforge(path, device)


__all__ = ["is_hf_folder", "load", "load_hf", "read_hf_weights", "save_hf"]
