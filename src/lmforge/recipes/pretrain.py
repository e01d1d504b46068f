"""Pre-training recipe: corpus → tokenizer → token shard → model → the training loop, for each family:
causal (next-token), masked (BERT's MLM) and seq2seq (T5's span corruption). Only the default
preset, tokenizer kind, batch maker and loss differ; loop, checkpoints and resume are shared.

`pretrain(PretrainConfig(...))` is what `lmforge pretrain` and the YAML config both reach.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import FAMILIES, ModelConfig
from lmforge.data import (
    STDLIB,
    MaskedWindows,
    RandomWindows,
    SpanCorruptionBatches,
    TokenShard,
    build_shard,
    load_shard,
    read_documents,
    resolve_files,
)
from lmforge.data.fim import FimEncoder, add_fim_tokens, check_fim_options
from lmforge.errors import UserError
from lmforge.estimate import compute_optimal_tokens, flops_per_token
from lmforge.files import check_can_create
from lmforge.interop import load
from lmforge.models import Model, build_model
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe, train_char, train_unigram, train_wordpiece
from lmforge.train import FAMILY_LOSSES, TrainConfig, TrainResult, save_checkpoint, train
from lmforge.train.distributed import setup
from lmforge.train.loop import CHECKPOINT_DIR

DATA_DIR = "data"
OBJECTIVES = ("auto", "fim")
TOKENIZER_KINDS = ("auto", "bpe", "char", "wordpiece", "unigram")
# Per family: the default model preset and the tokenizer its literature uses.
FAMILY_DEFAULTS = {"causal": ("small", "bpe"), "masked": ("small-bert", "wordpiece"),
                   "seq2seq": ("small-t5", "unigram")}


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
    kind: str = field(default="auto", metadata={
        "help": "auto (the family's: bpe | wordpiece | unigram) | bpe (byte-level) | char | wordpiece | unigram"})
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size (bpe, wordpiece, unigram)"})
    max_bytes: int = field(default=8_000_000, metadata={"help": "characters of text to train the tokenizer on"})
    num_sentinels: int = field(default=100, metadata={"help": "unigram: T5 sentinel tokens <extra_id_N>"})

    def __post_init__(self) -> None:
        if self.kind not in TOKENIZER_KINDS:
            raise UserError(f"tokenizer.kind='{self.kind}' is not one of: {', '.join(TOKENIZER_KINDS)}")


@dataclass
class PretrainConfig:
    out_dir: str = field(default="runs/pretrain", metadata={"help": "run folder (checkpoint, metrics, plots)"})
    family: str = field(default="causal", metadata={
        "help": "causal (next token) | masked (BERT MLM: 15 pct of tokens, 80/10/10) | seq2seq (T5 span corruption)"})
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "preset name (default: the family's small one) plus any ModelConfig field", "options": ModelConfig})
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    overwrite: bool = field(default=False, metadata={"help": "start afresh even if out_dir holds a checkpoint"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from these weights and tokenizer (lmforge checkpoint or Hugging Face folder)"})
    mask_rate: float = field(default=0.15, metadata={"help": "masked: share of tokens chosen for the MLM loss"})
    noise_density: float = field(default=0.15, metadata={"help": "seq2seq: share of tokens in corrupted spans"})
    mean_span_length: float = field(default=3.0, metadata={"help": "seq2seq: mean corrupted span length"})
    objective: str = field(default="auto", metadata={
        "help": "auto (the family's) | fim (causal: fill-in-the-middle, Bavarian et al. 2022)"})
    fim_rate: float = field(default=0.5, metadata={"help": "fim: share of documents rearranged"})
    fim_mode: str = field(default="psm", metadata={"help": "fim: psm | spm | psm+spm (50/50 per document)"})

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"family='{self.family}' is not one of: {', '.join(FAMILIES)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective='{self.objective}' is not one of: {', '.join(OBJECTIVES)}")
        if self.objective == "fim":
            if self.family != "causal":
                raise UserError(f"--objective fim trains a causal model; --family is {self.family}, "
                                "drop it or pass --family causal")
            check_fim_options(self.fim_rate, self.fim_mode)

@dataclass
class PretrainResult:
    model: Model
    tokenizer: Tokenizer
    result: TrainResult
    out_dir: Path


def build_tokenizer(cfg: TokenizerConfig, data: DataConfig, files: list[Path], family: str = "causal") -> Tokenizer:
    """Load cfg.path, or train a tokenizer of cfg.kind (auto: the family's) on at most cfg.max_bytes of `files`."""
    if cfg.path:
        return Tokenizer.load(cfg.path)
    kind = FAMILY_DEFAULTS[family][1] if cfg.kind == "auto" else cfg.kind
    limit = min(cfg.max_bytes, data.max_bytes or cfg.max_bytes)
    docs = read_documents(files, data.jsonl_field, limit)
    trainers = {
        "char": lambda: train_char(docs),
        "bpe": lambda: train_bpe(docs, cfg.vocab_size, DEFAULT_SPECIALS),
        "wordpiece": lambda: train_wordpiece(docs, cfg.vocab_size),
        "unigram": lambda: train_unigram(docs, cfg.vocab_size, cfg.num_sentinels),
    }
    tokenizer = trainers[kind]()
    if tokenizer.vocab_size == len(tokenizer.special_ids):
        raise UserError("the corpus is empty; check --data.sources")
    return tokenizer


def model_config(model: dict[str, Any], vocab_size: int, family: str = "causal") -> ModelConfig:
    """Preset (default: the family's) + overrides; the vocabulary comes from the tokenizer unless set larger."""
    overrides = dict(model)
    preset = overrides.pop("preset", FAMILY_DEFAULTS[family][0])
    if overrides.get("vocab_size", vocab_size) < vocab_size:
        raise UserError(f"model.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab_size}")
    overrides.setdefault("vocab_size", vocab_size)
    cfg = ModelConfig.from_preset(preset, **overrides)
    if cfg.family != family:
        raise UserError(f"preset '{preset}' is a {cfg.family} model but --family is {family}; pass --family "
                        f"{cfg.family} or a {family} preset such as {FAMILY_DEFAULTS[family][0]}")
    return cfg


def check_model_options(model: dict[str, Any], family: str) -> None:
    """Fail on a bad --model.* before minutes of tokenizer training, not after."""
    model_config(model, int(model.get("vocab_size", 1)), family)


def batch_makers(cfg: PretrainConfig, model_cfg: ModelConfig, shard: TokenShard, tokenizer: Tokenizer
                 ) -> tuple[Any, Any]:
    """(train, validation or None) batch functions for the model's family; each is index -> batch."""
    def make(tokens: Any, seed: int, split: str) -> Any:
        batch, context = cfg.train.batch_size, model_cfg.context_length
        if model_cfg.family == "masked":
            specials = tokenizer.special_ids
            ordinary = sorted(set(range(tokenizer.vocab_size)) - set(specials))
            return MaskedWindows(tokens, batch, context, seed, _need(tokenizer.mask_id, "mask"), ordinary,
                                 specials, split, cfg.mask_rate)
        if model_cfg.family == "seq2seq":
            if not tokenizer.sentinel_ids:
                raise UserError("span corruption needs sentinel tokens <extra_id_N>; use --tokenizer.kind unigram")
            return SpanCorruptionBatches(tokens, batch, context, seed, tokenizer.sentinel_ids,
                                         _need(tokenizer.eos_id, "eos"), _need(tokenizer.pad_id, "pad"), split,
                                         cfg.noise_density, cfg.mean_span_length)
        return RandomWindows(tokens, batch, context, seed, split)

    val = make(shard.val, cfg.train.seed + 1, "validation") if len(shard.val) else None
    return make(shard.train, cfg.train.seed, "train"), val


def _need(token_id: int | None, role: str) -> int:
    if token_id is None:
        raise UserError(f"the tokenizer has no {role} token, which this family's objective needs; "
                        "train one of the family's kind (--tokenizer.kind auto)")
    return token_id


def _describe(model: Model, train_cfg: TrainConfig, train_tokens: int, val_tokens: int) -> None:
    """One line on model size, data size, and how this run's token budget compares with Chinchilla's."""
    n, cfg = model.num_parameters(), model.cfg
    seen = train_cfg.steps * train_cfg.batch_size * train_cfg.grad_accum * cfg.context_length
    print(f"model: {n / 1e6:.2f}M parameters, {cfg.n_layers} layers, d={cfg.d_model}, vocab {cfg.vocab_size}; "
          f"data: {train_tokens:,} train / {val_tokens:,} val tokens; this run sees {seen:,} tokens "
          f"({seen / compute_optimal_tokens(n):.2f}x the compute-optimal 20 tokens/parameter)")


def _initial_model(cfg: PretrainConfig, files: list[Path]) -> tuple[Model | None, Tokenizer]:
    """(model to start from or None, tokenizer): --init_from brings both; otherwise a tokenizer is built."""
    if not cfg.init_from:
        return None, build_tokenizer(cfg.tokenizer, cfg.data, files, cfg.family)
    model, tokenizer = load(cfg.init_from)
    if tokenizer is None:
        raise UserError(f"'{cfg.init_from}' has no tokenizer.json; --init_from needs the model's tokenizer")
    if model.cfg.family != cfg.family:
        raise UserError(f"'{cfg.init_from}' is a {model.cfg.family} model; pass --family {model.cfg.family}")
    return model, tokenizer


def pretrain(cfg: PretrainConfig) -> PretrainResult:
    out = Path(cfg.out_dir)
    check_can_create(out, "--out_dir")
    fresh = not out.exists()
    dist = setup(cfg.train.distributed, cfg.train.device)  # under torchrun: joins the process group
    try:
        # Rank 0 builds tokenizer and token shard; the others wait, then read them (a failure on rank 0 ends all).
        prepared = _prepare(cfg, out, save_tokenizer=dist.active) if dist.is_main else None
        dist.barrier()
        initial, tokenizer, shard, model_cfg = prepared or _read_prepared(cfg, out)
        train_batches, val_batches = batch_makers(cfg, model_cfg, shard, tokenizer)
    except BaseException:
        if fresh and dist.is_main:  # a run that fails before training leaves no half-built folder
            shutil.rmtree(out, ignore_errors=True)
        raise
    context, batch = model_cfg.context_length, cfg.train.batch_size
    torch.manual_seed(cfg.train.seed)  # the initial weights too: the same config gives the same run
    model = build_model(model_cfg) if cfg.resume or initial is None else initial.train()
    if dist.is_main:
        _describe(model, cfg.train, len(shard.train), len(shard.val))
    result = train(
        model, train_batches, cfg.train, loss_fn=FAMILY_LOSSES[model_cfg.family], val_batches=val_batches, out_dir=out,
        tokens_per_step=batch * context * cfg.train.grad_accum,
        flops_per_token=flops_per_token(model_cfg, context),
        save=lambda folder, state, tensors: save_checkpoint(folder, model, tokenizer, state, tensors),
        resume=cfg.resume,
    )
    from lmforge.plots import plot_loss_curve  # matplotlib only where a picture is drawn

    if dist.is_main:
        plot_loss_curve(out / "metrics.jsonl", out / "loss.png")
    return PretrainResult(model=model.eval(), tokenizer=tokenizer, result=result, out_dir=out)


def _read_prepared(cfg: PretrainConfig, out: Path) -> tuple[Model | None, Tokenizer, TokenShard, ModelConfig]:
    """What `_prepare` on rank 0 left in out_dir, for the other ranks of a distributed run."""
    if cfg.resume:
        return _prepare(cfg, out)  # resuming only reads
    initial = load(cfg.init_from)[0] if cfg.init_from else None
    tokenizer = Tokenizer.load(out / DATA_DIR)
    model_cfg = initial.cfg if initial is not None else model_config(cfg.model, tokenizer.vocab_size, cfg.family)
    return initial, tokenizer, load_shard(out / DATA_DIR), model_cfg


def _prepare(cfg: PretrainConfig, out: Path, save_tokenizer: bool = False
             ) -> tuple[Model | None, Tokenizer, TokenShard, ModelConfig]:
    """(--init_from model or None, tokenizer, token shard, model config): from out_dir's checkpoint on --resume,
    else from the corpus, writing the shard and pretrain_config.json (save_tokenizer: the tokenizer too, for
    the other ranks) into out_dir."""
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
        if not cfg.init_from:
            check_model_options(cfg.model, cfg.family)
        files = resolve_files(cfg.data.sources, cfg.data.shuffle_seed)  # once, for tokenizer and shard
        initial, tokenizer = _initial_model(cfg, files)
        if cfg.objective == "fim":
            _add_fim(cfg, initial, tokenizer)
        model_cfg = initial.cfg if initial is not None else model_config(cfg.model, tokenizer.vocab_size, cfg.family)
        docs = read_documents(files, cfg.data.jsonl_field, cfg.data.max_bytes)
        # FIM is applied per document before packing (as in the paper), once: batches stay a pure function of the
        # index, and the validation tail is rearranged like the rest, so val loss is the loss the run optimises.
        encode = FimEncoder(tokenizer, cfg.fim_rate, cfg.fim_mode, cfg.train.seed) if cfg.objective == "fim" else None
        shard = build_shard(docs, tokenizer, out / DATA_DIR, cfg.data.val_fraction, encode=encode)
        if save_tokenizer:
            tokenizer.save(out / DATA_DIR)
        (out / "pretrain_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    return initial, tokenizer, shard, model_cfg


def _add_fim(cfg: PretrainConfig, initial: Model | None, tokenizer: Tokenizer) -> None:
    """Give the tokenizer the FIM tokens (a loaded one too) and record the mode; an --init_from model must have
    rows for them."""
    add_fim_tokens(tokenizer, cfg.fim_mode)
    if initial is not None and tokenizer.vocab_size > initial.cfg.vocab_size:
        raise UserError(f"'{cfg.init_from}' has {initial.cfg.vocab_size} token embeddings, too few for its tokenizer "
                        f"plus the FIM tokens ({tokenizer.vocab_size}); --objective fim needs a model trained with "
                        "them, or pre-train from scratch")


@dataclass
class TokenizerTrainConfig:
    out: str = field(default="runs/tokenizer", metadata={"help": "folder for tokenizer.json + tokenizer_config.json"})
    family: str = field(default="causal", metadata={"help": "whose tokenizer kind 'auto' picks: causal | masked | "
                                                            "seq2seq"})
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def train_tokenizer(cfg: TokenizerTrainConfig) -> Tokenizer:
    """Train a tokenizer on the corpus and save it; what `lmforge tokenizer train` runs."""
    if cfg.tokenizer.path:
        raise UserError("tokenizer.path is for loading; to train a new tokenizer leave it unset")
    check_can_create(cfg.out, "--out")
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.data, resolve_files(cfg.data.sources, cfg.data.shuffle_seed),
                                cfg.family)
    tokenizer.save(cfg.out)
    return tokenizer
