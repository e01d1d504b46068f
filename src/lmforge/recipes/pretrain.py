"""Pre-training recipe: corpus → tokenizer → token shard → CausalLM → the training loop.

`pretrain(PretrainConfig(...))` is what `lmforge pretrain` and the YAML config both reach.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import ModelConfig
from lmforge.data import STDLIB, RandomWindows, build_shard, load_shard, read_documents, resolve_files
from lmforge.errors import UserError
from lmforge.estimate import compute_optimal_tokens, flops_per_token
from lmforge.interop import load
from lmforge.models import CausalLM
from lmforge.plots import plot_loss_curve
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe, train_char
from lmforge.train import TrainConfig, TrainResult, save_checkpoint, train
from lmforge.train.loop import CHECKPOINT_DIR

DATA_DIR = "data"


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: [STDLIB],
                               metadata={"help": "files, folders or .jsonl; 'stdlib' = this Python's own sources"})
    jsonl_field: str = field(default="text", metadata={"help": "field holding the text in .jsonl files"})
    val_fraction: float = field(default=0.05, metadata={"help": "tail fraction of tokens held out for validation"})
    max_bytes: int | None = field(default=None, metadata={"help": "use at most this many characters of text"})
    shuffle_seed: int = field(default=0, metadata={"help": "seed for the order of files"})


@dataclass
class TokenizerConfig:
    path: str | None = field(default=None, metadata={"help": "existing tokenizer folder/file; unset = train one"})
    kind: str = field(default="bpe", metadata={"help": "bpe (byte-level) | char"})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size"})
    max_bytes: int = field(default=8_000_000, metadata={"help": "characters of text to train the tokenizer on"})

    def __post_init__(self) -> None:
        if self.kind not in ("bpe", "char"):
            raise UserError(f"tokenizer.kind='{self.kind}' is not one of: bpe, char")


@dataclass
class PretrainConfig:
    out_dir: str = field(default="runs/pretrain", metadata={"help": "run folder (checkpoint, metrics, plots)"})
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "small"},
                                  metadata={"help": "preset name plus any ModelConfig field", "options": ModelConfig})
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh even if out_dir holds a checkpoint"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from these weights and tokenizer (lmforge checkpoint or Hugging Face folder)"})


@dataclass
class PretrainResult:
    model: CausalLM
    tokenizer: Tokenizer
    result: TrainResult
    out_dir: Path


def build_tokenizer(cfg: TokenizerConfig, data: DataConfig, files: list[Path]) -> Tokenizer:
    """Load cfg.path, or train a tokenizer of cfg.kind on (at most cfg.max_bytes of) the corpus `files`."""
    if cfg.path:
        return Tokenizer.load(cfg.path)
    limit = min(cfg.max_bytes, data.max_bytes or cfg.max_bytes)
    docs = read_documents(files, data.jsonl_field, limit)
    tokenizer = train_char(docs) if cfg.kind == "char" else train_bpe(docs, cfg.vocab_size, DEFAULT_SPECIALS)
    if tokenizer.vocab_size == len(tokenizer.specials):
        raise UserError("the corpus is empty; check --data.sources")
    return tokenizer


def model_config(model: dict[str, Any], vocab_size: int) -> ModelConfig:
    """Preset + overrides; the vocabulary comes from the tokenizer unless set larger explicitly."""
    overrides = dict(model)
    preset = overrides.pop("preset", "small")
    if overrides.get("vocab_size", vocab_size) < vocab_size:
        raise UserError(f"model.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    overrides.setdefault("vocab_size", vocab_size)
    return ModelConfig.from_preset(preset, **overrides)


def _describe(model: CausalLM, train_cfg: TrainConfig, train_tokens: int, val_tokens: int) -> None:
    """One line on model size, data size, and how this run's token budget compares with Chinchilla's."""
    n, cfg = model.num_parameters(), model.cfg
    seen = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum * cfg.context_length
    print(f"model: {n / 1e6:.2f}M parameters, {cfg.n_layers} layers, d={cfg.d_model}, vocab {cfg.vocab_size}; "
          f"data: {train_tokens:,} train / {val_tokens:,} val tokens; this run sees {seen:,} tokens "
          f"({seen / compute_optimal_tokens(n):.2f}x the compute-optimal 20 tokens/parameter)")


def _initial_model(cfg: PretrainConfig, files: list[Path]) -> tuple[CausalLM | None, Tokenizer]:
    """(model to start from or None, tokenizer): --init_from brings both; otherwise a tokenizer is built."""
    if not cfg.init_from:
        return None, build_tokenizer(cfg.tokenizer, cfg.data, files)
    model, tokenizer = load(cfg.init_from)
    if tokenizer is None:
        raise UserError(f"'{cfg.init_from}' has no tokenizer.json; --init_from needs the model's tokenizer")
    return model, tokenizer


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    out = Path(cfg.out_dir)
    checkpoint = out / CHECKPOINT_DIR
    initial = None
    if cfg.resume:
        if not (checkpoint / "config.json").is_file():
            raise UserError(f"nothing to resume in '{out}' (no {CHECKPOINT_DIR}/config.json); drop --resume")
        tokenizer = Tokenizer.load(checkpoint)
        shard = load_shard(out / DATA_DIR)
        model_cfg = ModelConfig.load(checkpoint / "config.json")
    else:
        if checkpoint.exists() and not cfg.overwrite:
            raise UserError(f"'{out}' already holds a checkpoint; pass --resume to continue it, --overwrite to "
                            "start afresh, or choose another --out_dir")
        files = resolve_files(cfg.data.sources, cfg.data.shuffle_seed)  # once, for tokenizer and shard
        initial, tokenizer = _initial_model(cfg, files)
        model_cfg = initial.cfg if initial is not None else model_config(cfg.model, tokenizer.vocab_size)
        docs = read_documents(files, cfg.data.jsonl_field, cfg.data.max_bytes)
        shard = build_shard(docs, tokenizer, out / DATA_DIR, cfg.data.val_fraction)
        (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    context, batch = model_cfg.context_length, cfg.train.batch_size
    train_batches = RandomWindows(shard.train, batch, context, cfg.train.seed, "train")
    val_batches = RandomWindows(shard.val, batch, context, cfg.train.seed + 1, "validation") if len(shard.val) else None
    model = CausalLM(model_cfg) if cfg.resume or initial is None else initial.train()
    _describe(model, cfg.train, len(shard.train), len(shard.val))
    result = train(
        model, train_batches, cfg.train, val_batches=val_batches, out_dir=out,
        tokens_per_step=batch * context * cfg.train.grad_accum,
        flops_per_token=flops_per_token(model_cfg, context),
        save=lambda folder, state, tensors: save_checkpoint(folder, model, tokenizer, state, tensors),
        resume=cfg.resume,
    )
    plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    return PretrainResult(model=model.eval(), tokenizer=tokenizer, result=result, out_dir=out)


@dataclass
class TokenizerTrainConfig:
    out: str = field(default="runs/tokenizer", metadata={"help": "folder for tokenizer.json + tokenizer_config.json"})
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def train_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    """Train a tokenizer on the corpus and save it; what `lmforge tokenizer train` runs."""
    if cfg.tokenizer.path:
        raise UserError("tokenizer.path is for loading; to train a new tokenizer leave it unset")
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data, resolve_files(cfg.data.sources, cfg.data.shuffle_seed))
    tokenizer.save(cfg.out)
    return tokenizer
