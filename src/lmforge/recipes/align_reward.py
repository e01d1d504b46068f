"""`lmforge align reward`: train a reward model on preference pairs; `lmforge align score`: score text with one.

pairs (JSONL, hh-rlhf transcripts or rankings) → the prompt through the chat template where the tokenizer has
one → a scalar head on the backbone (--model: a pretrained causal LM or encoder, its head replaced; or --preset
from scratch with a BPE tokenizer trained on the pairs) → the one training loop with the Bradley-Terry loss →
out_dir/checkpoint (an ordinary checkpoint folder) and out_dir/reward_report.json (held-out pair accuracy and
margin, before and after training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.align.reward import (
    PairBatches,
    bradley_terry_loss,
    encode_pairs,
    pad_id_of,
    pair_metrics,
    reward_fn_from_checkpoint,
    reward_model_from,
)
from lmforge.config import ModelConfig
from lmforge.data.corpus import jsonl_values
from lmforge.data.preferences import (
    PreferencePair,
    apply_chat_template,
    read_hh_rlhf,
    read_pairs,
    read_preferences,
    read_rankings,
    split_pairs,
)
from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.interop import load
from lmforge.models import Model, build_model
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe
from lmforge.train import TrainConfig, save_checkpoint, train
from lmforge.train.loop import CHECKPOINT_DIR

FORMATS = ("auto", "pairs", "hh-rlhf", "rankings")
REPORT_FILE = "reward_report.json"


@dataclass
class PreferenceDataConfig:
    """Where preference pairs come from, shared by `align reward` and `align dpo`."""

    data: str = field(default="", metadata={
        "help": "pairs .jsonl (prompt/chosen/rejected), hh-rlhf transcripts (.jsonl.gz) or rankings .jsonl "
                "(required)"})
    format: str = field(default="auto", metadata={"help": "auto | pairs | hh-rlhf | rankings (auto: by name)"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out pairs; unset = split off eval_fraction"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of --data held out when no --eval_file"})
    max_pairs: int = field(default=0, metadata={"help": "use only the first N pairs of --data (0 = all)"})
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    chat_template: bool = field(default=True, metadata={
        "help": "render prompts through the tokenizer's chat template where it has one"})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"format='{self.format}' is not one of: {', '.join(FORMATS)}")
        if self.max_pairs < 0:
            raise UserError(f"max_pairs={self.max_pairs} must be >= 0 (0 = all)")


def read_data(cfg: PreferenceDataConfig, path: str) -> list[PreferencePair]:
    if cfg.format == "rankings":
        return read_rankings(path, cfg.prompt_field)
    if cfg.format == "pairs":
        return read_pairs(path, cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)
    if cfg.format == "hh-rlhf":
        return read_hh_rlhf(path)[0]
    return read_preferences(path, cfg.prompt_field, cfg.chosen_field, cfg.rejected_field)


def train_and_held_out(cfg: PreferenceDataConfig, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    if not cfg.data:
        raise UserError("pass --data with preference pairs (.jsonl of prompt/chosen/rejected, or hh-rlhf .jsonl.gz)")
    pairs = read_data(cfg, cfg.data)
    pairs = pairs[:cfg.max_pairs] if cfg.max_pairs else pairs
    if cfg.eval_file:
        return pairs, read_data(cfg, cfg.eval_file)
    return split_pairs(pairs, cfg.eval_fraction, seed)


def templated(pairs: list[PreferencePair], tokenizer: Tokenizer, use: bool) -> list[PreferencePair]:
    return [apply_chat_template(tokenizer, p) for p in pairs] if use else pairs


@dataclass
class RewardConfig:
    model: str = field(default="", metadata={
        "help": "backbone: a causal or encoder checkpoint / Hugging Face folder (its head is replaced by a "
                "scalar one), or a reward model to continue"})
    preset: str = field(default="", metadata={
        "help": "instead of --model: a model preset trained from scratch, with a byte-level BPE tokenizer "
                "trained on the pairs"})
    vocab_size: int = field(default=1024, metadata={"help": "with --preset: the BPE tokenizer's vocabulary"})
    prefs: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    max_length: int = field(default=256, metadata={"help": "tokens per prompt+completion (capped at the context)"})
    pooling: str = field(default="cls", metadata={"help": "encoders: cls (tanh pooler on the first token) | mean"})
    out_dir: str = field(default="runs/reward", metadata={"help": "run folder (checkpoint, metrics, report)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a checkpoint already in out_dir"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=16, lr=1e-4, warmup_steps=20, eval_every=0, eval_batches=5, weight_decay=0.0))

    def __post_init__(self) -> None:
        if bool(self.model) == bool(self.preset):
            raise UserError("pass exactly one of --model (a checkpoint to start from) and --preset (from scratch)")
        if self.max_length < 4:
            raise UserError(f"max_length={self.max_length} must be at least 4")
        if self.pooling not in ("cls", "mean"):
            raise UserError(f"pooling='{self.pooling}' is not one of: cls, mean")


@dataclass
class AlignResult:
    """What an align recipe trained: the model (eval mode), its tokenizer, the report it wrote, the run folder."""

    model: Model
    tokenizer: Tokenizer
    report: dict[str, Any]
    out_dir: Path


def _backbone(cfg: RewardConfig, train_pairs: list[PreferencePair]) -> tuple[Model, Tokenizer, str]:
    if cfg.model:
        base, tokenizer = load(cfg.model)
        if tokenizer is None:
            raise UserError(f"'{cfg.model}' has no tokenizer.json; a reward model needs its backbone's tokenizer")
        return base, tokenizer, cfg.model
    texts = (t for p in train_pairs for t in (p.prompt, p.chosen, p.rejected))
    tokenizer = train_bpe(texts, cfg.vocab_size, DEFAULT_SPECIALS)
    preset = ModelConfig.from_preset(cfg.preset, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return build_model(preset), tokenizer, f"preset {cfg.preset}, random init"


def run_reward(cfg: RewardConfig) -> AlignResult:
    """Train a reward model; returns it with its held-out report (also in out_dir/reward_report.json)."""
    out = Path(cfg.out_dir)
    check_can_create(out, "--out_dir")
    if (out / CHECKPOINT_DIR).exists() and not cfg.overwrite and not cfg.resume:
        raise UserError(f"'{out}' already holds a checkpoint; pass --resume true to continue it, --overwrite true "
                        "to replace it, or choose another --out_dir")
    train_pairs, held_pairs = train_and_held_out(cfg.prefs, cfg.train.seed)
    base, tokenizer, start = _backbone(cfg, train_pairs)
    torch.manual_seed(cfg.train.seed)  # the new head is reproducible
    model = reward_model_from(base, cfg.pooling, from_scratch=bool(cfg.preset))
    max_length = min(cfg.max_length, model.token_room)
    pad = pad_id_of(tokenizer)

    def batches(pairs: list[PreferencePair], seed: int) -> PairBatches:
        chosen, rejected = encode_pairs(templated(pairs, tokenizer, cfg.prefs.chat_template), tokenizer, model,
                                        max_length)
        return PairBatches(chosen, rejected, cfg.train.batch_size, pad, seed)

    train_batches, held = batches(train_pairs, cfg.train.seed), batches(held_pairs, cfg.train.seed + 1)
    print(f"reward model: {model.num_parameters() / 1e6:.2f}M parameters ({type(model).__name__}, {start}); "
          f"{len(train_pairs):,} training pairs, {len(held_pairs):,} held out")
    before = pair_metrics(model, held)
    result = train(model, train_batches, cfg.train, loss_fn=bradley_terry_loss, val_batches=held, out_dir=out,
                   tokens_per_step=train_batches.tokens_per_batch,
                   save=lambda folder, state, tensors: _save(folder, model, tokenizer, state, tensors),
                   resume=cfg.resume)
    after = pair_metrics(model, held)
    report = {"model": start, "class": type(model).__name__, "train_pairs": len(train_pairs),
              "held_out_pairs": len(held_pairs), "before": before, "held_out": after, "steps": result.step,
              "train_seconds": result.seconds, "checkpoint": str(out / CHECKPOINT_DIR)}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out pair accuracy {100 * after['accuracy']:.1f}% (before training {100 * before['accuracy']:.1f}%), "
          f"mean margin {after['margin']:.3f}; reward model in {out / CHECKPOINT_DIR}")
    return AlignResult(model.eval(), tokenizer, report, out)


def _save(folder: Path, model: Model, tokenizer: Tokenizer, state: dict, tensors: dict) -> None:
    save_checkpoint(folder, model, tokenizer, state, tensors)


@dataclass
class ScoreConfig:
    model: str = field(default="", metadata={"help": "a reward-model folder (from `lmforge align reward`)"})
    prompt: str = field(default="", metadata={"help": "the prompt the completions answer"})
    completion: list[str] = field(default_factory=list, metadata={"help": "completion(s) to score"})
    data: str | None = field(default=None, metadata={
        "help": "instead: a .jsonl of records with prompt and completion fields; scores printed in order"})
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    batch_size: int = 16


def run_score(cfg: ScoreConfig) -> list[float]:
    """Print one score per completion (tab, then the completion) and return them."""
    if not cfg.model:
        raise UserError("pass --model with a reward-model folder")
    if bool(cfg.data) == bool(cfg.completion):
        raise UserError("pass either --completion TEXT (with --prompt) or --data FILE.jsonl")
    if cfg.data:
        path = Path(cfg.data)
        if not path.is_file():
            raise UserError(f"--data '{path}' does not exist")
        fix = "give every line a prompt and a completion field"
        prompts = [str(v) for _, v in jsonl_values(path, cfg.prompt_field, fix)]
        completions = [str(v) for _, v in jsonl_values(path, cfg.completion_field, fix)]
    else:
        prompts, completions = [cfg.prompt] * len(cfg.completion), list(cfg.completion)
    scores = reward_fn_from_checkpoint(cfg.model, batch_size=cfg.batch_size)(prompts, completions)
    for value, completion in zip(scores, completions, strict=True):
        print(f"{value:.4f}\t{completion}")
    return scores
