"""`lmforge align dpo`: Direct Preference Optimization of a causal LM on preference pairs.

pairs (JSONL, hh-rlhf, rankings; prompts through the chat template where the tokenizer has one) → the
reference's log-probs of every chosen and rejected completion, computed once before training (the starting
model itself, before any adapter is added, unless --ref_model names another) and cached in
out_dir/reference_logps.safetensors → the policy (full fine-tuning or any PEFT method, as `finetune` applies
them) trained through the one training loop with the DPO loss → out_dir/checkpoint (a full checkpoint, or the
adapter as finetune saves it) and out_dir/dpo_report.json (held-out loss, implicit-reward accuracy and margin,
before and after).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lmforge.align.dpo import (
    DpoBatches,
    DpoLoss,
    EncodedPairs,
    cached_reference_logps,
    check_dpo_options,
    disable_dropout,
    encode_preference_pairs,
    evaluate_dpo,
    reference_fingerprint,
    reference_logps,
)
from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.models import CausalLM
from lmforge.peft import METHODS, describe, method_restorer, method_saver, with_method
from lmforge.recipes.align_common import load_causal
from lmforge.recipes.align_reward import AlignResult, PreferenceDataConfig, templated, train_and_held_out
from lmforge.recipes.finetune import MethodOptions
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, train
from lmforge.train.loop import CHECKPOINT_DIR

REPORT_FILE = "dpo_report.json"


@dataclass
class DpoConfig:
    model: str = field(default="", metadata={"help": "the causal LM to align: checkpoint or Hugging Face folder "
                                                     "(usually an SFT model; required)"})
    ref_model: str | None = field(default=None, metadata={
        "help": "the frozen reference; unset = --model itself (the base, before any adapter)"})
    method: str = field(default="full", metadata={
        "help": "full | lora | qlora | prompt | prefix | adapter | bitfit | selective"})
    peft: MethodOptions = field(default_factory=MethodOptions)
    prefs: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    beta: float = field(default=0.1, metadata={"help": "strength of the pull toward the reference (> 0)"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "conservative DPO: the share of pairs whose label is assumed flipped, in [0, 0.5)"})
    max_length: int = field(default=256, metadata={"help": "tokens per prompt+completion (capped at the context)"})
    keep_dropout: bool = field(default=False, metadata={
        "help": "train the policy with its dropout (off by default: the reference is scored without it)"})
    out_dir: str = field(default="runs/dpo", metadata={"help": "run folder (checkpoint, metrics, reference cache)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a checkpoint already in out_dir"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=200, batch_size=8, lr=5e-5, warmup_steps=10, eval_every=0, eval_batches=5, weight_decay=0.0))

    def __post_init__(self) -> None:
        check_dpo_options(self.beta, self.label_smoothing)
        if self.method not in METHODS:
            raise UserError(f"method='{self.method}' is not one of: {', '.join(METHODS)}")
        if self.max_length < 2:
            raise UserError(f"max_length={self.max_length} must be at least 2 (a prompt token and a completion token)")


def _reference(cfg: DpoConfig, base: CausalLM, tokenizer: Tokenizer, datasets: dict[str, EncodedPairs],
               out: Path, max_length: int) -> dict[str, torch.Tensor]:
    """Each data set's (N, 2) reference log-probs, from the cache when it was made from the same reference
    and data."""
    reference = base
    if cfg.ref_model:
        reference, ref_tokenizer = load_causal(cfg.ref_model, "--ref_model", "DPO")
        if ref_tokenizer.vocab_size != tokenizer.vocab_size:
            raise UserError(f"--ref_model '{cfg.ref_model}' has a {ref_tokenizer.vocab_size}-token vocabulary, "
                            f"--model {tokenizer.vocab_size}; the reference must share the policy's tokenizer")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    fingerprint = reference_fingerprint(reference, datasets, max_length)
    values, cached = cached_reference_logps(out, fingerprint, lambda: {
        name: reference_logps(reference, data, pad, max_length, cfg.train.batch_size)
        for name, data in datasets.items()})
    print(f"reference log-probs: {'read from the cache' if cached else 'computed'} "
          f"({', '.join(f'{len(d)} {n}' for n, d in datasets.items())} pairs)")
    return values


def run_dpo(cfg: DpoConfig) -> AlignResult:
    """Align cfg.model on preference pairs with DPO; returns the policy and its held-out report."""
    if not cfg.model:
        raise UserError("align dpo needs --model (a causal checkpoint or Hugging Face folder) and --prefs.data FILE")
    out = Path(cfg.out_dir)
    check_can_create(out, "--out_dir")
    if (out / CHECKPOINT_DIR).exists() and not cfg.overwrite and not cfg.resume:
        raise UserError(f"'{out}' already holds a checkpoint; pass --resume true to continue it, --overwrite true "
                        "to replace it, or choose another --out_dir")
    train_pairs, held_pairs = train_and_held_out(cfg.prefs, cfg.train.seed)
    base, tokenizer = load_causal(cfg.model, "--model", "DPO")
    max_length = min(cfg.max_length, base.token_room)
    datasets = {name: encode_preference_pairs(templated(pairs, tokenizer, cfg.prefs.chat_template), tokenizer)
                for name, pairs in (("train", train_pairs), ("held_out", held_pairs))}
    reference = _reference(cfg, base, tokenizer, datasets, out, max_length)
    torch.manual_seed(cfg.train.seed)  # the method's initial tensors (LoRA's A) are reproducible
    policy = with_method(base, cfg.method, asdict(cfg.peft))
    if not cfg.keep_dropout:
        disable_dropout(policy)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_batches, held = (DpoBatches(datasets[name], reference[name], cfg.train.batch_size, pad, max_length, seed)
                           for name, seed in (("train", cfg.train.seed), ("held_out", cfg.train.seed + 1)))
    print(f"DPO: {len(train_pairs):,} training pairs, {len(held_pairs):,} held out; beta {cfg.beta}, label "
          f"smoothing {cfg.label_smoothing}; method {cfg.method}: {describe(policy)}")
    before = evaluate_dpo(policy, held, cfg.beta, cfg.label_smoothing)
    loss_fn = DpoLoss(cfg.beta, cfg.label_smoothing)
    result = train(policy, train_batches, cfg.train, loss_fn=loss_fn, val_batches=held, out_dir=out,
                   tokens_per_step=train_batches.tokens_per_batch, save=method_saver(policy, tokenizer),
                   restore=method_restorer(policy), resume=cfg.resume)
    after = evaluate_dpo(policy, held, cfg.beta, cfg.label_smoothing)
    report = {"model": cfg.model, "reference": cfg.ref_model or cfg.model, "method": cfg.method, "beta": cfg.beta,
              "label_smoothing": cfg.label_smoothing, "train_pairs": len(train_pairs),
              "held_out_pairs": len(held_pairs), "before": before, "held_out": after, "steps": result.step,
              "train_seconds": result.seconds, "checkpoint": str(out / CHECKPOINT_DIR)}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(f"held-out implicit-reward accuracy {100 * after['reward_accuracy']:.1f}%, margin "
          f"{after['reward_margin']:.3f}, DPO loss {before['loss']:.4f} -> {after['loss']:.4f}; policy in "
          f"{out / CHECKPOINT_DIR}")
    return AlignResult(policy.eval(), tokenizer, report, out)
