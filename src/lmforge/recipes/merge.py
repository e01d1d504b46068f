"""`lmforge merge`: fold a fine-tuning method's tensors (a LoRA/QLoRA adapter, BitFit biases, ...) into the
base model and write a plain checkpoint or Hugging Face folder: zero-overhead inference, no lmforge.peft."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.checkpoint import save
from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.interop import load, load_adapter, save_hf
from lmforge.peft import merge

FORMATS = ("lmforge", "hf")


@dataclass
class MergeConfig:
    model: str = field(default="", metadata={"help": "the base: lmforge checkpoint or Hugging Face folder"})
    adapter: str = field(default="", metadata={"help": "fine-tune output: lmforge method state or a peft adapter"})
    out: str = field(default="", metadata={"help": "folder to write the merged model to"})
    format: str = field(default="lmforge", metadata={"help": "lmforge | hf"})


def run_merge(cfg: MergeConfig) -> Path:
    if not (cfg.model and cfg.adapter and cfg.out):
        raise UserError("merge needs --model BASE --adapter ADAPTER_FOLDER --out DST")
    if cfg.format not in FORMATS:
        raise UserError(f"format='{cfg.format}' is not one of: {', '.join(FORMATS)}")
    if not Path(cfg.adapter).is_dir():
        raise UserError(f"adapter '{cfg.adapter}' is not a folder; pass the fine-tune's checkpoint folder")
    check_can_create(cfg.out, "--out")
    model, tokenizer = load(cfg.model)
    merged = merge(load_adapter(model, cfg.adapter))
    if cfg.format == "hf":
        save_hf(cfg.out, merged, tokenizer, tokenizer_source=cfg.model)
    else:
        save(cfg.out, merged, tokenizer)
    print(f"merged {cfg.adapter} into {cfg.model} -> {cfg.format} {cfg.out}")
    return Path(cfg.out)
