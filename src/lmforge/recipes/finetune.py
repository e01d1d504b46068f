"""Fine-tuning recipe, the shared loop with a task's batches and loss.

`--method` picks what trains: full (every weight), lora, qlora, prompt, prefix, adapter, bitfit or
selective (`lmforge.peft`); a PEFT run's checkpoint holds only the trained tensors (method.json +
method.safetensors), which `generate --adapter` and `lmforge merge` apply to the base.

`--task instruct` (causal or seq2seq models): prompt→completion data (JSONL, Alpaca JSON, or any
JSONL through a template), loss on completion tokens only, optional packing, several datasets mixed
by weight. `--task classify` (encoders): a sequence-classification head on labelled text, with dev
accuracy. `--from_scratch` trains the same architecture from random weights — the baseline that
shows what pre-training bought.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.data.instructions import LAYOUTS, DatasetSpec, InstructionBatches, encode_examples, read_examples
from lmforge.data.labelled import ClassificationBatches, encode_labelled, read_labelled
from lmforge.errors import UserError
from lmforge.evaluate.metrics import classifier_accuracy, perplexity
from lmforge.files import check_can_create, read_text
from lmforge.interop import load
from lmforge.models import CausalLM, Model, build_model, classifier_from
from lmforge.peft import METHODS, describe, measure_peak_memory, method_restorer, method_saver, with_method
from lmforge.tokenizer import Tokenizer
from lmforge.train import FAMILY_LOSSES, TrainConfig, batch_loss, train
from lmforge.train.distributed import setup
from lmforge.train.loop import CHECKPOINT_DIR

TASKS = ("auto", "instruct", "classify")


@dataclass
class MethodOptions:
    """Options of the PEFT methods; unset ones keep the method's defaults (lmforge.peft)."""

    r: int | None = field(default=None, metadata={"help": "lora/qlora rank (default 8)"})
    alpha: float | None = field(default=None, metadata={"help": "lora/qlora alpha; scale = alpha/r (default 16)"})
    dropout: float | None = field(default=None, metadata={"help": "lora/qlora dropout on the update's input"})
    targets: list[str] | None = field(default=None, metadata={
        "help": "lora/qlora projections: q k v o gate up down (cross_q ... for seq2seq) | all (default q v)"})
    block_size: int | None = field(default=None, metadata={"help": "qlora: NF4 block size (default 64)"})
    double_quant: bool | None = field(default=None, metadata={"help": "qlora: quantize the block scales too"})
    n_tokens: int | None = field(default=None, metadata={"help": "prompt/prefix: virtual tokens (default 20)"})
    hidden: int | None = field(default=None, metadata={"help": "prefix: reparameterising MLP width (0 = none)"})
    bottleneck: int | None = field(default=None, metadata={"help": "adapter: bottleneck width (default d/16)"})
    patterns: list[str] | None = field(default=None, metadata={"help": "selective: parameter-name patterns"})
    unfreeze: list[str] | None = field(default=None, metadata={"help": "also train these parameter patterns"})


@dataclass
class FinetuneConfig:
    model: str = field(default="", metadata={"help": "checkpoint or Hugging Face folder to start from (required)"})
    method: str = field(default="full", metadata={
        "help": "full | lora | qlora | prompt | prefix | adapter | bitfit | selective"})
    peft: MethodOptions = field(default_factory=MethodOptions)
    forgetting_data: str | None = field(default=None, metadata={
        "help": "causal: text file (e.g. pre-training validation text) scored by perplexity before and after"})
    task: str = field(default="auto", metadata={
        "help": "instruct (prompt -> completion) | classify (labelled text) | auto: classify for encoders"})
    data: list[str] = field(default_factory=list, metadata={
        "help": "training file(s): instruct: .jsonl prompt/completion, Alpaca .json, or any .jsonl with "
                "--prompt_template; classify: '<label> <text>' lines or .jsonl (required)"})
    data_weights: list[float] = field(default_factory=list, metadata={"help": "instruct: sampling weight per file"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out examples (loss; classify: accuracy)"})
    template: str = field(default="instruction", metadata={
        "help": "instruct layout of instruction/input records: instruction | flan | plain | chat (tokenizer's)"})
    prompt_template: str | None = field(default=None, metadata={
        "help": "instruct: prompt from record fields, e.g. 'Summarize:\\n{dialogue}\\n'"})
    completion_field: str | None = field(default=None, metadata={"help": "instruct: the record field to learn"})
    pack: bool = field(default=False, metadata={"help": "instruct, causal: pack examples into full rows"})
    text_field: str = field(default="text", metadata={"help": "classify .jsonl: field holding the text"})
    label_field: str = field(default="label", metadata={"help": "classify .jsonl: field holding the label"})
    out_dir: str = field(default="runs/finetune", metadata={"help": "run folder (checkpoint, metrics, eval.json)"})
    max_length: int = field(default=256, metadata={"help": "tokens per example (capped at the model's context)"})
    pooling: str = field(default="cls", metadata={"help": "cls (BERT's tanh pooler on the first token) | mean"})
    from_scratch: bool = field(default=False, metadata={"help": "same architecture, random weights (baseline)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a checkpoint already in out_dir"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=32, lr=1e-4, warmup_steps=30, eval_every=100, eval_batches=10, weight_decay=0.01))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"task='{self.task}' is not one of: {', '.join(TASKS)}")
        if self.method not in METHODS:
            raise UserError(f"method='{self.method}' is not one of: {', '.join(METHODS)}")
        if self.template not in (*LAYOUTS, "chat"):
            raise UserError(f"template='{self.template}' is not one of: {', '.join([*LAYOUTS, 'chat'])}")
        if self.max_length < 3:
            raise UserError(f"max_length={self.max_length} must be at least 3 ([CLS] text [SEP])")


@dataclass
class FinetuneResult:
    model: Model
    tokenizer: Tokenizer
    accuracy: float | None  # classify: percentage correct on eval_file
    seconds: float
    out_dir: Path


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    if not cfg.model or not cfg.data:
        raise UserError("finetune needs --model (a checkpoint or HF folder) and --data FILE")
    out = Path(cfg.out_dir)
    check_can_create(out, "--out_dir")
    if (out / CHECKPOINT_DIR).exists() and not cfg.overwrite and not cfg.resume:
        raise UserError(f"'{out}' already holds a checkpoint; pass --resume true to continue it, --overwrite true "
                        "to replace it, or choose another --out_dir")
    dist = setup(cfg.train.distributed, cfg.train.device)  # under torchrun: every rank reads, only rank 0 writes
    say = print if dist.is_main else (lambda *_: None)
    base, tokenizer = load(cfg.model)
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; fine-tuning needs the model's tokenizer")
    task = cfg.task if cfg.task != "auto" else ("classify" if base.cfg.family == "masked" else "instruct")
    prepare = _prepare_classify if task == "classify" else _prepare_instruct
    torch.manual_seed(cfg.train.seed)  # new heads and the method's initial tensors (LoRA's A) are reproducible
    model, train_batches, eval_batches, loss_fn, about = prepare(cfg, base, tokenizer)
    forgetting_text = _forgetting_ids(cfg, model, tokenizer)
    before = _perplexity(model, forgetting_text)
    start, count = "random init" if cfg.from_scratch else cfg.model, describe(model)
    say(f"model: {count.total / 1e6:.2f}M parameters ({start}); {about}\nmethod {cfg.method}: {count}")
    result, peak = measure_peak_memory(lambda: train(
        model, train_batches, cfg.train, loss_fn=loss_fn, val_batches=eval_batches, out_dir=out,
        tokens_per_step=train_batches.tokens_per_batch, save=method_saver(model, tokenizer),
        restore=method_restorer(model), resume=cfg.resume))
    say(peak)
    report: dict[str, Any] = {
        "task": task, "method": cfg.method, "trainable_parameters": count.trainable, "total_parameters": count.total,
        "peak_memory_bytes": peak.bytes, "train_seconds": result.seconds, "steps": result.step,
        "seconds_per_step": result.seconds / max(len(result.losses), 1), "val_losses": result.val_losses}
    score = None
    if task == "classify" and eval_batches is not None:
        score = classifier_accuracy(model, eval_batches.in_order())
        say(f"accuracy on {cfg.eval_file}: {score:.2f}% ({len(eval_batches.encoded)} examples)")
        report.update(accuracy=score, labels=model.cfg.labels)
    if forgetting_text is not None:
        after = _perplexity(model, forgetting_text)
        say(f"forgetting: perplexity on {cfg.forgetting_data} {before:.2f} -> {after:.2f}")
        report.update(forgetting={"data": cfg.forgetting_data, "perplexity_before": before, "perplexity_after": after})
    if dist.is_main:
        (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    return FinetuneResult(model.eval(), tokenizer, score, result.seconds, out)


def _forgetting_ids(cfg: FinetuneConfig, model: Model, tokenizer: Tokenizer) -> list[int] | None:
    if not cfg.forgetting_data:
        return None
    if not isinstance(model, CausalLM):
        raise UserError("--forgetting_data measures perplexity, which needs a causal model")
    return tokenizer.encode(read_text(cfg.forgetting_data, "forgetting data")[:200_000])


def _perplexity(model: Model, ids: list[int] | None) -> float | None:
    if ids is None:
        return None
    return perplexity(model.eval(), ids).perplexity


def _chosen(options: MethodOptions) -> dict[str, Any]:
    return dataclasses.asdict(options)


def _fresh_or(base: Model, from_scratch: bool) -> Model:
    return build_model(base.cfg) if from_scratch else base


def _prepare_classify(cfg: FinetuneConfig, base: Model, tokenizer: Tokenizer) -> tuple:
    if len(cfg.data) != 1:
        raise UserError(f"classify trains on one labelled file; got --data {cfg.data}")
    train_data = read_labelled(cfg.data[0], cfg.text_field, cfg.label_field)
    names = sorted(set(train_data.labels))
    model = with_method(classifier_from(base, names, cfg.pooling, cfg.from_scratch), cfg.method, _chosen(cfg.peft),
                        head_trains=True)
    max_length = min(cfg.max_length, model.token_room)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def batches(path: str, labelled: object, seed: int) -> ClassificationBatches:
        return ClassificationBatches(*encode_labelled(labelled, tokenizer, names, max_length, path),
                                     cfg.train.batch_size, pad, seed)

    train_batches = batches(cfg.data[0], train_data, cfg.train.seed)
    eval_batches = None
    if cfg.eval_file:
        eval_batches = batches(cfg.eval_file, read_labelled(cfg.eval_file, cfg.text_field, cfg.label_field),
                               cfg.train.seed + 1)
    about = f"{len(train_data.texts):,} training examples, labels {names}"
    return model, train_batches, eval_batches, batch_loss, about


def _prepare_instruct(cfg: FinetuneConfig, base: Model, tokenizer: Tokenizer) -> tuple:
    family = base.cfg.family
    if family == "masked":
        raise UserError("instruction fine-tuning needs a causal or seq2seq model; an encoder takes --task classify")
    weights = cfg.data_weights or [1.0] * len(cfg.data)
    if len(weights) != len(cfg.data):
        raise UserError(f"--data_weights has {len(weights)} values for {len(cfg.data)} --data files")
    model = with_method(_fresh_or(base, cfg.from_scratch), cfg.method, _chosen(cfg.peft))
    max_length = min(cfg.max_length, model.token_room)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def encoded(path: str) -> list:
        spec = DatasetSpec(path, prompt_template=cfg.prompt_template, completion_field=cfg.completion_field)
        examples = read_examples(spec, "instruction" if cfg.template == "chat" else cfg.template)
        return encode_examples(examples, tokenizer, max_length, chat=cfg.template == "chat")

    def batches(datasets: list, mix: list[float], seed: int) -> InstructionBatches:
        return InstructionBatches(datasets, mix, cfg.train.batch_size, pad, family,
                                  max_length if cfg.pack and family == "causal" else None, seed, tokenizer.eos_id)

    train_sets = [encoded(path) for path in cfg.data]
    eval_batches = batches([encoded(cfg.eval_file)], [1.0], cfg.train.seed + 1) if cfg.eval_file else None
    about = f"{sum(len(d) for d in train_sets):,} training examples from {len(cfg.data)} file(s), mix {weights}"
    return model, batches(train_sets, weights, cfg.train.seed), eval_batches, FAMILY_LOSSES[family], about
