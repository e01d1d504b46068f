"""Reading and writing Hugging Face model folders, and `load` for either layout.

An HF folder is config.json (with `model_type`) + model.safetensors, or a sharded
model.safetensors.index.json, or pytorch_model.bin (read with torch.load(weights_only=True),
never a full unpickle), plus tokenizer.json / tokenizer_config.json when present.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.checkpoint import (
    COMPRESSION_FILE,
    CONFIG_FILE,
    load_model_tensors,
    model_tensors,
    read_safetensors,
    write_atomically,
)
from lmforge.checkpoint import load as load_lmforge
from lmforge.compress.storage import load_compressed
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.files import read_json_object
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
_REDOWNLOAD = "copy or download the folder again"
GENERATION_FILE = "generation_config.json"
TOKENIZER_EXTRAS = ("special_tokens_map.json", "chat_template.jinja", GENERATION_FILE)


def is_hf_folder(path: str | Path) -> bool:
    config = Path(path) / CONFIG_FILE
    return config.is_file() and "model_type" in read_json_object(config, "model config", _REDOWNLOAD)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder, from safetensors (single or sharded) or weights-only .bin files."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", _load_bin)):
        index = folder / index_name
        if index.is_file():
            weight_map = read_json_object(index, "weight index", _REDOWNLOAD).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"weight index '{index}' has no weight_map object; {_REDOWNLOAD}")
            shards = sorted(set(map(str, weight_map.values())))
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                raise UserError(f"weight index '{index}' names shard(s) {missing[:3]} that '{folder}' lacks; "
                                f"{_REDOWNLOAD}")
            return {k: v for shard in shards for k, v in reader(folder / shard).items()}
    if (folder / "model.safetensors").is_file():
        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise UserError(f"'{folder}' has a config.json but no model.safetensors, sharded index or pytorch_model.bin")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin read with weights_only=True: tensors come out, any other pickled object is refused
    (unpickling it could run arbitrary code)."""
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise UserError(f"'{path}' is not a readable PyTorch weights file ({str(exc).splitlines()[0]}); "
                            f"{_REDOWNLOAD}") from None
        raise UserError(f"'{path}' holds pickled Python objects that are not tensors; lmforge refuses to unpickle "
                        "them (that could run any code): get the model as model.safetensors, or convert it with a "
                        "tool you trust") from None
    except (RuntimeError, EOFError, OSError) as exc:  # truncated or not a torch.save file at all
        raise UserError(f"'{path}' is not a readable PyTorch weights file ({str(exc).splitlines()[0]}); it may be "
                        f"truncated: {_REDOWNLOAD}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise UserError(f"'{path}' does not hold a mapping of weight names to tensors; {_REDOWNLOAD}")
    return tensors


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
    hf_cfg = read_json_object(folder / CONFIG_FILE, "model config", _REDOWNLOAD)
    raw = read_hf_weights(folder)
    try:
        cfg = config_from_hf(hf_cfg, raw)
    except UserError as exc:
        raise UserError(f"model config '{folder / CONFIG_FILE}': {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:  # a field missing or of the wrong type
        raise UserError(f"model config '{folder / CONFIG_FILE}' lacks a field or has one of the wrong type "
                        f"({type(exc).__name__}: {exc}); {_REDOWNLOAD}") from None
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
    if (Path(path) / COMPRESSION_FILE).is_file():
        return load_compressed(path, device)
    return load_lmforge(path, device)


__all__ = ["is_hf_folder", "load", "load_hf", "read_hf_weights", "save_hf"]
