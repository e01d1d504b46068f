"""Compressed checkpoints are ordinary lmforge folders plus `compression.json`, which says how the model was
compressed: {"quantization": {...}, "pruning": {...}, "distillation": {...}}, any of them.

Quantized layers keep their codes and scales as registered buffers, so the model's own state dict is what
model.safetensors holds. `quantization.layers` maps each replaced module's name to its format and options; loading
builds the dense model on the meta device, swaps those modules for empty quantized ones of the same shapes and
adopts the stored tensors, so a 4-bit model never exists in fp32 on the way in. Pruned and distilled models are
plain weights (zeros, or a smaller config): only the record says what was done to them.

A quantized folder has whole-model dtypes too: `quantization.dtype` ("float16"/"bfloat16") for the fp16/bf16
methods, whose tensors are stored and loaded in that dtype.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import (
    COMPRESSION_FILE,
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_model_tensors,
    read_safetensors,
    save_model,
    write_atomically,
)
from lmforge.compress.quant import restore_quantized_layers
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.models import Model, model_class
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def read_compression(folder: str | Path) -> dict[str, Any] | None:
    """The folder's compression record, or None for an uncompressed checkpoint."""
    path = Path(folder) / COMPRESSION_FILE
    if not path.is_file():
        return None
    return read_json_object(path, "compression record", "copy the folder again or re-run the compression")


def save_compressed(folder: str | Path, model: Model, tokenizer: Tokenizer | None, info: dict[str, Any]) -> None:
    """Write a checkpoint folder (config, weights with any quantized buffers, tokenizer) plus compression.json,
    atomically: a crash leaves the previous folder or none, never half of one."""
    record = json.dumps(info, indent=2, sort_keys=True) + "\n"

    def write(tmp: Path) -> None:
        save_model(tmp, model, tokenizer)
        (tmp / COMPRESSION_FILE).write_text(record)

    write_atomically(folder, write)


def load_compressed(folder: str | Path, device: str | torch.device = "cpu") -> tuple[Model, Tokenizer | None]:
    """Load a folder `save_compressed` wrote → (model in eval mode, tokenizer or None)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"'{folder}' is not a checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    quantization = (read_compression(folder) or {}).get("quantization") or {}
    cfg = ModelConfig.load(folder / CONFIG_FILE)
    model = model_class(cfg).for_loading(cfg)
    layers = quantization.get("layers") or {}
    if not isinstance(layers, dict):
        raise UserError(f"'{folder / COMPRESSION_FILE}' has a quantization.layers that is not a mapping; re-run "
                        "lmforge quantize")
    restore_quantized_layers(model, layers)
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    load_model_tensors(model, tensors, str(folder / WEIGHTS_FILE), assign=True)
    if quantization.get("dtype"):  # fp16/bf16: the position tables and norms follow the weights' dtype
        model = model.to(half_dtype(quantization["dtype"], folder))
    tokenizer = Tokenizer.load(folder) if (folder / TOKENIZER_FILE).is_file() else None
    return model.to(device).eval(), tokenizer


def half_dtype(name: str, folder: str | Path) -> torch.dtype:
    if name not in HALF_DTYPES:
        raise UserError(f"'{Path(folder) / COMPRESSION_FILE}' names dtype '{name}', not one of: "
                        f"{', '.join(HALF_DTYPES)}; re-run lmforge quantize")
    return HALF_DTYPES[name]
