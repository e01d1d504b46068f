"""lmforge: a language model's whole life in one readable, fast, tested PyTorch codebase.

`import lmforge` is light: the names below load their modules on first use, so a server worker or a
script that needs only the models never imports the recipes, the data pipeline or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_HOMES = {
    "PRESETS": "lmforge.config", "ModelConfig": "lmforge.config", "UserError": "lmforge.errors",
    "SamplingConfig": "lmforge.generate", "generate": "lmforge.generate", "generate_text": "lmforge.generate",
    "load": "lmforge.interop", "save_hf": "lmforge.interop", "CausalLM": "lmforge.models",
    "DemoConfig": "lmforge.recipes.demo", "demo": "lmforge.recipes.demo",
    "DataConfig": "lmforge.recipes.pretrain", "PretrainConfig": "lmforge.recipes.pretrain",
    "TokenizerConfig": "lmforge.recipes.pretrain", "TokenizerTrainConfig": "lmforge.recipes.pretrain",
    "pretrain": "lmforge.recipes.pretrain", "train_tokenizer": "lmforge.recipes.pretrain",
    "Tokenizer": "lmforge.tokenizer", "train_bpe": "lmforge.tokenizer", "train_char": "lmforge.tokenizer",
    "TrainConfig": "lmforge.train", "train": "lmforge.train",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lmforge' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
