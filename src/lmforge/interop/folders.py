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

from lmforge.errors import UserError
from lmforge.interop.hf import config_from_hf, from_hf_state_dict, hf_config, to_hf_state_dict
from lmforge.models import CausalLM
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer
from lmforge.train.checkpoint import CONFIG_FILE, load_model_tensors, model_tensors, write_atomically
from lmforge.train.checkpoint import load as load_lmforge

# Buffers some HF checkpoints store that are not weights (GPT-2's causal masks, old rotary tables).
_NON_WEIGHTS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
TOKENIZER_EXTRAS = ("special_tokens_map.json", "chat_template.jinja", "generation_config.json")


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


def _normalise_keys(hf: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    weights = {k: v for k, v in hf.items() if not k.endswith(_NON_WEIGHTS)}
    if model_type == "gpt2" and not any(k.startswith("transformer.") for k in weights):
        weights = {k if k == "lm_head.weight" else f"transformer.{k}": v for k, v in weights.items()}
    return weights


def load_hf(folder: str | Path, device: str | torch.device = "cpu") -> tuple[CausalLM, Tokenizer | None]:
    """Load an HF GPT-2 / Llama / Mistral / Qwen2 folder into lmforge's CausalLM (no HF code involved)."""
    folder = Path(folder)
    hf_cfg = json.loads((folder / CONFIG_FILE).read_text())
    cfg = config_from_hf(hf_cfg)
    weights = _normalise_keys(read_hf_weights(folder), hf_cfg["model_type"])
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    ours = from_hf_state_dict(cfg, weights)
    leftover = sorted(set(weights) - set(to_hf_state_dict(cfg, {k: v.to("meta") for k, v in ours.items()})))
    if leftover:
        raise UserError(f"'{folder}' has weights lmforge would ignore: {leftover[:5]}; the config and weights disagree")
    model = CausalLM.for_loading(cfg)
    load_model_tensors(model, {k: v.float() for k, v in ours.items()}, str(folder), assign=True)
    tokenizer = Tokenizer.load(folder) if (folder / TOKENIZER_FILE).is_file() else None
    return model.to(device).eval(), tokenizer


def save_hf(folder: str | Path, model: CausalLM, tokenizer: Tokenizer | None = None,
            tokenizer_source: str | Path | None = None) -> None:
    """Write an HF folder `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits."""
    config = hf_config(model.cfg)
    config.update(torch_dtype="float32", transformers_version="5.0.0")
    if tokenizer is not None:
        config.update({f"{role}_token_id": getattr(tokenizer, f"{role}_id") for role in ("bos", "eos", "pad")})

    def write(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(to_hf_state_dict(model.cfg, model_tensors(model)), str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for extra in TOKENIZER_EXTRAS if tokenizer_source else ():
            if (Path(tokenizer_source) / extra).is_file():
                shutil.copy2(Path(tokenizer_source) / extra, tmp / extra)

    write_atomically(Path(folder), write)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[CausalLM, Tokenizer | None]:
    """Load a model folder in either layout: lmforge checkpoint or Hugging Face."""
    if not Path(path).is_dir():
        raise UserError(f"'{path}' is not a folder; pass a checkpoint folder or a Hugging Face model folder")
    if is_hf_folder(path):
        return load_hf(path, device)
    return load_lmforge(path, device)


__all__ = ["is_hf_folder", "load", "load_hf", "read_hf_weights", "save_hf"]
