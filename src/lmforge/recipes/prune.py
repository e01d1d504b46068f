"""`lmforge prune`: prune a checkpoint, optionally fine-tune it back with the masks held, save a compressed
checkpoint and report what it cost in held-out perplexity and bought in bytes and decode speed.

Methods (`lmforge.compress.prune`):
- magnitude: the smallest |W| in each layer (`--scope layer`), over all block linears (`global`) or per row;
- wanda: |W| * ||X|| on calibration activations, per output row (Sun et al. 2023);
- 2:4 (N:M with `--n`/`--m`): n of every m consecutive inputs kept, by `--score magnitude|wanda`;
- heads / neurons: whole attention heads (KV groups under GQA) or MLP hidden units removed by importance, the same
  number per layer, so the result is a smaller model with a new config; `--sparsity` is the fraction removed.

`--recover_steps N` fine-tunes the pruned model for N steps on the same corpus with the model's own objective
(pretrain's batch makers), the masks re-applied after every optimizer step; `--gradual` instead raises the sparsity
from 0 to S along Zhu & Gupta's cubic schedule over the first `gradual_fraction` of those steps. The run's
checkpoint and metrics.jsonl go to `--run_dir` (default OUT.recovery); `--resume` continues it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.compress.prune import (
    METHODS,
    STRUCTURED,
    GradualPruning,
    PruneOutcome,
    block_linears,
    calibration_batches,
    check_options,
    input_norms,
    prune,
    resolve_scope,
)
from lmforge.compress.storage import save_compressed
from lmforge.data.shards import TokenShard
from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.interop import load
from lmforge.models import Model
from lmforge.recipes.compress_common import (
    CompressData,
    calibration_ids,
    check_model_and_out,
    compression_report,
    finish_report,
    token_stream,
)
from lmforge.recipes.pretrain import PretrainConfig, batch_makers
from lmforge.tokenizer import Tokenizer
from lmforge.train import FAMILY_LOSSES, TrainConfig, train
from lmforge.train.loop import CHECKPOINT_DIR


def _recovery_train() -> TrainConfig:
    """Recovery fine-tuning starts from trained weights: a small lr, a short warm-up, evaluation at the end."""
    return TrainConfig(lr=1e-4, warmup_steps=10, batch_size=8, eval_every=0, eval_batches=4, save_every_minutes=0)


@dataclass
class PruneConfig:
    model: str = field(default="", metadata={"help": "lmforge checkpoint or Hugging Face folder (required)"})
    method: str = field(default="magnitude", metadata={"help": " | ".join(METHODS)})
    out: str = field(default="", metadata={"help": "folder for the pruned checkpoint (required)"})
    sparsity: float | None = field(default=None, metadata={
        "help": "fraction removed in [0, 1): of the weights (magnitude, wanda), of the heads or MLP neurons per "
                "layer (heads, neurons); default 0.5; 2:4 prunes 1 - n/m"})
    scope: str = field(default="auto", metadata={
        "help": "magnitude/wanda ranking group: layer | global | row | auto (magnitude: layer, wanda: row)"})
    score: str = field(default="magnitude", metadata={"help": "2:4: which weights of a group to keep: magnitude | "
                                                              "wanda"})
    n: int = field(default=2, metadata={"help": "2:4: weights kept in every group of m"})
    m: int = field(default=4, metadata={"help": "2:4: consecutive input weights per group"})
    sequential: bool = field(default=True, metadata={
        "help": "wanda: gather each block's activations after pruning the blocks before it (the paper's order)"})
    recover_steps: int = field(default=0, metadata={
        "help": "fine-tuning steps after pruning, masks held (this sets train.steps); 0 = none"})
    gradual: bool = field(default=False, metadata={
        "help": "magnitude/wanda: raise sparsity 0 -> S on a cubic schedule during the recovery steps"})
    gradual_fraction: float = field(default=0.5, metadata={
        "help": "gradual: share of the recovery steps over which sparsity rises (then held at S)"})
    prune_every: int = field(default=0, metadata={"help": "gradual: steps between re-masking; 0 = a tenth of the "
                                                          "ramp"})
    train: TrainConfig = field(default_factory=_recovery_train)
    run_dir: str | None = field(default=None, metadata={
        "help": "recovery run folder (checkpoint, metrics.jsonl); default OUT.recovery"})
    resume: bool = field(default=False, metadata={"help": "continue the recovery run in run_dir"})
    report: bool = field(default=True, metadata={"help": "measure perplexity, bytes and decode speed against the "
                                                         "original and write compression_report.json"})
    device: str = field(default="cpu", metadata={"help": "where calibration and the report run: cpu | cuda | auto"})
    data: CompressData = field(default_factory=CompressData)

    def __post_init__(self) -> None:
        check_options(self.method, self.sparsity, self.scope, self.score, self.n, self.m, self.gradual)
        if self.recover_steps < 0:
            raise UserError(f"recover_steps={self.recover_steps} must be >= 0 (0 = no recovery fine-tuning)")
        if self.gradual and self.recover_steps == 0:
            raise UserError("--gradual prunes during recovery fine-tuning; give --recover_steps N > 0")
        if not 0.0 < self.gradual_fraction <= 1.0:
            raise UserError(f"gradual_fraction={self.gradual_fraction} must be in (0, 1]")
        if self.prune_every < 0:
            raise UserError(f"prune_every={self.prune_every} must be >= 0 (0 = a tenth of the ramp)")

    @property
    def recovery_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(f"{self.out}.recovery")


def calibrated(cfg: PruneConfig) -> bool:
    """Whether the method scores by calibration activations (Wanda, heads, neurons, 2:4 by Wanda)."""
    return cfg.method in ("wanda", *STRUCTURED) or (cfg.method == "2:4" and cfg.score == "wanda")


def needs_text(cfg: PruneConfig) -> bool:
    """Whether the run reads calibration or training text (and so needs the model's tokenizer)."""
    return calibrated(cfg) or cfg.recover_steps > 0 or cfg.report


def prune_model(model: Model, cfg: PruneConfig, tokenizer: Tokenizer | None) -> tuple[PruneOutcome, int]:
    """Prune `model` as cfg says (in place for masks; a new model for heads/neurons) → (outcome, calibration
    windows used). With --gradual nothing is pruned yet: the outcome's masks are the schedule's hook."""
    batches = []
    if calibrated(cfg) and tokenizer is not None:
        batches = calibration_batches(model, calibration_ids(cfg.data, tokenizer, model.token_room))
    windows = sum(len(batch["input_ids"]) for batch in batches)
    if cfg.gradual:
        return _gradual(model, cfg, batches), windows
    outcome = prune(model, cfg.method, cfg.sparsity, scope=cfg.scope, score=cfg.score, n=cfg.n, m=cfg.m,
                    batches=batches, sequential=cfg.sequential)
    return outcome, windows


def _gradual(model: Model, cfg: PruneConfig, batches: list) -> PruneOutcome:
    target = 0.5 if cfg.sparsity is None else cfg.sparsity
    end = max(1, round(cfg.gradual_fraction * cfg.recover_steps))
    every = cfg.prune_every or max(1, end // 10)
    norms = input_norms(model, block_linears(model), batches) if cfg.method == "wanda" else None
    scope = resolve_scope(cfg.method, cfg.scope)
    hook = GradualPruning(model, target, scope, end, every, norms)
    info = {"method": cfg.method, "sparsity_asked": target, "scope": scope,
            "gradual": {"schedule": "cubic (Zhu & Gupta 2017)", "end_step": end, "every": every}}
    return PruneOutcome(model, hook, info)


def recovery_batches(model: Model, cfg: PruneConfig, tokenizer: Tokenizer) -> tuple[Any, Any]:
    """(train, validation) batch functions of pretrain's objective for the model's family on the corpus head and
    held-out tail of --data (the same split the report scores)."""
    tokens = token_stream(cfg.data, tokenizer)
    held = int(len(tokens) * cfg.data.val_fraction)
    shard = TokenShard(train=tokens[: len(tokens) - held], val=np.asarray(tokens[len(tokens) - held:]), meta={})
    return batch_makers(PretrainConfig(family=model.cfg.family, train=cfg.train), model.cfg, shard, tokenizer)


def recover(model: Model, cfg: PruneConfig, tokenizer: Tokenizer, outcome: PruneOutcome) -> dict[str, Any]:
    """Fine-tune the pruned model through the one training loop, the masks (or the gradual schedule) as its
    on_step hook; returns what the record keeps of the run."""
    train_cfg = dataclasses.replace(cfg.train, steps=cfg.recover_steps)
    train_batches, val_batches = recovery_batches(model, cfg, tokenizer)
    result = train(model, train_batches, train_cfg, loss_fn=FAMILY_LOSSES[model.cfg.family],
                   val_batches=val_batches, out_dir=cfg.recovery_dir, on_step=outcome.masks, resume=cfg.resume)
    model.eval()
    record: dict[str, Any] = {"steps": result.step, "lr": train_cfg.lr, "run_dir": str(cfg.recovery_dir)}
    if result.losses:
        record |= {"first_loss": result.losses[0], "last_loss": result.losses[-1]}
    if result.val_losses:
        record["val_loss"] = result.val_losses[-1][1]
    return record


def _check_paths(cfg: PruneConfig) -> dict[str, Any]:
    """Refuse bad paths before loading anything; return the input's own compression record (to merge)."""
    before = check_model_and_out("prune", cfg.model, cfg.out,
                                 "prune its full-precision original, then quantize the pruned model")
    if cfg.recover_steps:
        check_can_create(cfg.recovery_dir, "--run_dir")
        if cfg.resume and not (cfg.recovery_dir / CHECKPOINT_DIR).is_dir():
            raise UserError(f"nothing to resume in '{cfg.recovery_dir}' (no {CHECKPOINT_DIR}/); drop --resume")
    return before


def run_prune(cfg: PruneConfig) -> dict[str, Any]:
    """Load, prune, optionally recover, save a compressed checkpoint, then (with --report) measure it against the
    original. Returns the report (or the pruning record without --report)."""
    before = _check_paths(cfg)
    original, tokenizer = load(cfg.model, pick_device(cfg.device))
    if tokenizer is None and needs_text(cfg):
        raise UserError(f"'{cfg.model}' has no tokenizer.json, which calibration, recovery and the report need to "
                        "read text; use --method magnitude (or 2:4 by magnitude) with --recover_steps 0 --report false")
    outcome, calibration = prune_model(copy.deepcopy(original), cfg, tokenizer)
    model = outcome.model
    record = {**outcome.info, "recover_steps": cfg.recover_steps, "source": str(cfg.model)}
    if "pruning" in before:  # pruned again (e.g. heads, then magnitude): the earlier record is kept inside
        record["previous"] = before["pruning"]
    if calibration:
        record["calibration"] = {"windows": calibration, "tokens": model.token_room}
    if cfg.recover_steps:
        record["recovery"] = recover(model, cfg, tokenizer, outcome)
    if outcome.masks is not None:  # the masks as they stand after recovery (the gradual ones reach S only there)
        outcome.masks.apply(model)
        reached = outcome.masks.sparsity()
        record |= {"sparsity_reached": reached["overall"], "per_layer": reached["per_layer"]}
    save_compressed(cfg.out, model.eval(), tokenizer, {**before, "pruning": record})
    print(f"pruned {cfg.model} with {cfg.method}: {record['sparsity_reached']:.2%} "
          f"{'of heads' if cfg.method == 'heads' else 'of MLP neurons' if cfg.method == 'neurons' else 'of weights'}"
          f" removed -> {cfg.out}")
    if not cfg.report:
        return {"pruning": record}
    pruned, _ = load(cfg.out, pick_device(cfg.device))  # measure what a user will load
    extra = {"method": cfg.method, "sparsity_asked": record["sparsity_asked"],
             "sparsity_reached": record["sparsity_reached"], "recover_steps": cfg.recover_steps}
    report = compression_report(original, pruned, tokenizer, cfg.data, original_folder=cfg.model,
                                compressed_folder=cfg.out, extra=extra)
    finish_report(report, cfg.out)
    return report


__all__ = ["PruneConfig", "calibrated", "needs_text", "prune_model", "recover", "recovery_batches", "run_prune"]
