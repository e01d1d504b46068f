"""lmforge: a language model's whole life in one readable, fast, tested PyTorch codebase."""

from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate, generate_text
from lmforge.interop import load, save_hf
from lmforge.models import CausalLM
from lmforge.recipes.demo import DemoConfig, demo
from lmforge.recipes.pretrain import (
    DataConfig,
    PretrainConfig,
    TokenizerConfig,
    TokenizerTrainConfig,
    pretrain,
    train_tokenizer,
)
from lmforge.tokenizer import Tokenizer, train_bpe, train_char
from lmforge.train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CausalLM", "DataConfig", "DemoConfig", "ModelConfig", "PretrainConfig", "SamplingConfig",
    "Tokenizer", "TokenizerConfig", "TokenizerTrainConfig", "TrainConfig", "UserError", "demo", "generate",
    "generate_text", "load", "pretrain", "save_hf", "train", "train_bpe", "train_char", "train_tokenizer",
]
