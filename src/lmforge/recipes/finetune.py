"""Fine-tuning recipe. `--task classify`: an encoder (lmforge masked-family checkpoint or HF BERT
folder) gets a sequence-classification head and is trained on labelled text with the shared loop;
dev accuracy is reported and saved. `--from_scratch` trains the same architecture from random
weights — the baseline that shows what pre-training bought.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.data.labelled import ClassificationBatches, encode_labelled, read_labelled
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import Model, SequenceClassifier, build_model
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, batch_loss, pick_device, save_checkpoint, train
from lmforge.train.checkpoint import load_model_tensors, model_tensors
from lmforge.train.loop import CHECKPOINT_DIR

TASKS = ("classify",)


@dataclass
class FinetuneConfig:
    model: str = field(default="", metadata={"help": "checkpoint or Hugging Face folder to start from (required)"})
    task: str = field(default="classify", metadata={"help": "classify (sequence classification)"})
    train_file: str = field(default="", metadata={"help": "'<label> <text>' lines or .jsonl (required)"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out examples for accuracy"})
    text_field: str = field(default="text", metadata={"help": ".jsonl field holding the text"})
    label_field: str = field(default="label", metadata={"help": ".jsonl field holding the label"})
    out_dir: str = field(default="runs/finetune", metadata={"help": "run folder (checkpoint, metrics, eval.json)"})
    max_length: int = field(default=128, metadata={"help": "tokens per example, [CLS] and [SEP] included"})
    pooling: str = field(default="cls", metadata={"help": "cls (BERT's tanh pooler on the first token) | mean"})
    from_scratch: bool = field(default=False, metadata={"help": "same architecture, random weights (baseline)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a checkpoint already in out_dir"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=300, batch_size=32, lr=1e-4, warmup_steps=30, eval_every=100, eval_batches=10, weight_decay=0.01))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UserError(f"task='{self.task}' is not one of: {', '.join(TASKS)}")
        if self.max_length < 3:
            raise UserError(f"max_length={self.max_length} must be at least 3 ([CLS] text [SEP])")


@dataclass
class FinetuneResult:
    model: Model
    tokenizer: Tokenizer
    accuracy: float | None
    seconds: float
    out_dir: Path


def classifier_from(encoder: Model, labels: list[str], pooling: str, from_scratch: bool) -> SequenceClassifier:
    """A SequenceClassifier sharing `encoder`'s architecture and (unless from_scratch) its encoder weights;
    the pooler and classifier start fresh. A classifier with the same labels is returned to continue."""
    if encoder.cfg.family != "masked":
        raise UserError(f"classification fine-tuning needs an encoder (masked family); this is a {encoder.cfg.family} "
                        "model")
    if isinstance(encoder, SequenceClassifier) and encoder.cfg.labels == labels and not from_scratch:
        return encoder
    cfg = dataclasses.replace(encoder.cfg, head="sequence", num_labels=len(labels), labels=labels, pooling=pooling)
    model = build_model(cfg)
    if not from_scratch:
        own = model.state_dict()
        shared = {k: v for k, v in model_tensors(encoder).items() if k in own and not k.startswith(("pooler.",
                                                                                                    "classifier."))}
        load_model_tensors(model, {**model_tensors(model), **shared}, "the encoder")
    return model


@torch.no_grad()
def accuracy(model: Model, batches: ClassificationBatches, device: torch.device) -> float:
    model.eval()
    right = total = 0
    for batch in batches.in_order():
        logits = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        right += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
        total += len(batch["labels"])
    return right / total


def finetune(cfg: FinetuneConfig) -> FinetuneResult:
    if not cfg.model or not cfg.train_file:
        raise UserError("finetune needs --model (a checkpoint or HF folder) and --train_file")
    out = Path(cfg.out_dir)
    if (out / CHECKPOINT_DIR).exists() and not cfg.overwrite:
        raise UserError(f"'{out}' already holds a checkpoint; pass --overwrite true or choose another --out_dir")
    encoder, tokenizer = load(cfg.model)
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; fine-tuning needs the model's tokenizer")
    train_data = read_labelled(cfg.train_file, cfg.text_field, cfg.label_field)
    names = sorted(set(train_data.labels))
    model = classifier_from(encoder, names, cfg.pooling, cfg.from_scratch)
    max_length = min(cfg.max_length, model.cfg.context_length)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train_batches = ClassificationBatches(*encode_labelled(train_data, tokenizer, names, max_length, cfg.train_file),
                                          cfg.train.batch_size, pad, cfg.train.seed)
    eval_batches = None
    if cfg.eval_file:
        eval_data = read_labelled(cfg.eval_file, cfg.text_field, cfg.label_field)
        eval_batches = ClassificationBatches(*encode_labelled(eval_data, tokenizer, names, max_length, cfg.eval_file),
                                             cfg.train.batch_size, pad, cfg.train.seed + 1)
    start = "random init" if cfg.from_scratch else cfg.model
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters ({start}); {len(train_data.texts):,} training "
          f"examples, labels {names}")
    result = train(model, train_batches, cfg.train, loss_fn=batch_loss, val_batches=eval_batches, out_dir=out,
                   tokens_per_step=train_batches.tokens_per_batch,
                   save=lambda folder, state, tensors: save_checkpoint(folder, model, tokenizer, state, tensors))
    score = accuracy(model, eval_batches, pick_device(cfg.train.device)) if eval_batches is not None else None
    if score is not None:
        print(f"accuracy on {cfg.eval_file}: {score:.4f} ({len(eval_batches.encoded)} examples)")
    (out / "eval.json").write_text(json.dumps({"accuracy": score, "train_seconds": result.seconds,
                                               "steps": result.step, "labels": names}, indent=1) + "\n")
    return FinetuneResult(model.eval(), tokenizer, score, result.seconds, out)
