"""`lmforge evaluate`: score a model on tasks at several shot counts (table + JSON + shots curve), or score
prediction files against reference files with a metric, no model needed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.evaluate import metrics
from lmforge.evaluate.harness import (
    ROW_HEADERS,
    evaluate_task,
    format_table,
    plot_shots_curve,
    report_rows,
    start_note,
)
from lmforge.evaluate.scoring import describe_start, resolve_start
from lmforge.evaluate.tasks import Task, known_tasks, load_task, perplexity_task
from lmforge.files import check_can_write, read_text
from lmforge.interop import is_hf_folder, load

FILE_METRICS = ("rouge", "bleu", "exact_match", "accuracy")


@dataclass
class EvaluateConfig:
    task: list[str] = field(default_factory=list, metadata={
        "help": "task name(s) or YAML file(s); built-in: " + ", ".join(known_tasks()) + ", perplexity"})
    model: str = field(default="", metadata={"help": "lmforge checkpoint or Hugging Face folder"})
    shots: list[str] = field(default_factory=lambda: ["0"], metadata={
        "help": "in-context examples per prompt, e.g. 0,1,5 (a shots curve: 0,1,2,5,8)"})
    limit: int | None = field(default=None, metadata={"help": "evaluate the first N examples (perplexity: tokens)"})
    seed: int = field(default=1234, metadata={"help": "seed of the shot draws (and of sampling, if any)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward pass"})
    out: str | None = field(default=None, metadata={"help": "JSON report; unset = runs/evaluate/<model>.json"})
    plot: str | None = field(default=None, metadata={
        "help": "PNG of score against shots; unset = next to the JSON when there are several shot counts"})
    data_root: str | None = field(default=None, metadata={"help": "folder task data paths are relative to; "
                                                                  "unset = $LMFORGE_DATA, else ../shared/data"})
    data: str | None = field(default=None, metadata={"help": "text file for --task perplexity"})
    context: int | None = field(default=None, metadata={"help": "perplexity window; unset = context_length"})
    stride: int | None = field(default=None, metadata={"help": "perplexity stride; unset = context/2"})
    chain_of_thought: bool | None = field(default=None, metadata={"help": "override the tasks' chain of thought"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "override the tasks' answer length"})
    stem: bool = field(default=True, metadata={"help": "ROUGE: Porter-stem words before matching"})
    metric: str | None = field(default=None, metadata={"help": " | ".join(FILE_METRICS) + ": score files, no model"})
    predictions: str | None = field(default=None, metadata={"help": "with --metric: one prediction per line"})
    references: list[str] = field(default_factory=list, metadata={
        "help": "with --metric: reference file(s), line-aligned; several files = several references each"})
    start: str = field(default="auto", metadata={
        "help": "what prompts start with: tokenizer (lm-evaluation-harness's: only what the tokenizer adds) | "
                "eos (lmforge's: EOS where the tokenizer adds no BOS, as training separates documents) | "
                "auto (tokenizer for a Hugging Face folder, eos for an lmforge checkpoint)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    threads: int | None = field(default=None, metadata={
        "help": "torch CPU threads; 1 is fastest for small models on a busy CPU; unset = torch's default"})


def parse_shots(values: list[str]) -> list[int]:
    """'0,1,5' or ['0', '1', '5'] -> [0, 1, 5] (order kept, duplicates dropped)."""
    shots: list[int] = []
    for item in ",".join(map(str, values)).split(","):
        if not item.strip():
            continue
        if not item.strip().isdigit():
            raise UserError(f"--shots value {item.strip()!r} is not a whole number >= 0; write e.g. --shots 0,1,5")
        if int(item) not in shots:
            shots.append(int(item))
    if not shots:
        raise UserError("--shots is empty; write e.g. --shots 0,1,5")
    return shots


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    if cfg.metric is not None:
        if cfg.task:
            raise UserError("give either --task (with --model) or --metric (with --predictions/--references)")
        return score_files(cfg)
    if not cfg.task:
        raise UserError(f"no task given; pass --task NAME_OR_YAML (known: {', '.join(known_tasks())}, perplexity) "
                        "or --metric rouge|bleu with --predictions and --references")
    if cfg.start not in ("auto", "tokenizer", "eos"):
        raise UserError(f"--start={cfg.start} is not a start convention; use auto, tokenizer or eos")
    shots, tasks = parse_shots(cfg.shots), [_task(name, cfg) for name in cfg.task]
    if not cfg.model:
        raise UserError("no model given; pass --model CHECKPOINT_OR_HF_FOLDER")
    check_can_write(cfg.out or default_out(cfg.model), "--out")  # before the evaluation, not after
    if cfg.plot:
        check_can_write(cfg.plot, "--plot")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size={cfg.batch_size} must be >= 1")
    start = resolve_start(cfg.start, is_hf_folder(cfg.model))
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise UserError(f"--threads={cfg.threads} must be >= 1")
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load(cfg.model, pick_device(cfg.device))
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; evaluation needs one")
    report: dict[str, Any] = {"model": cfg.model, "model_class": type(model).__name__,
                              "parameters": model.num_parameters(), "shots": shots, "limit": cfg.limit,
                              "seed": cfg.seed, "start": start, "start_tokens": describe_start(model, tokenizer, start),
                              "tasks": {}}
    for task in tasks:
        report["tasks"][task.name] = evaluate_task(model, tokenizer, task, shots, cfg.limit, cfg.seed,
                                                   cfg.batch_size, cfg.context, cfg.stride, cfg.stem, start=start)
    print("\n" + format_table(ROW_HEADERS, report_rows(report["tasks"])))
    note = start_note(report["tasks"])
    if note:
        print(note)
    _write(report, cfg, shots)
    return report


def _task(name: str, cfg: EvaluateConfig) -> Task:
    """Load a task, apply the command-line overrides, and check its files exist before the model loads."""
    if name == "perplexity":
        if not cfg.data:
            raise UserError("--task perplexity needs --data TEXT_FILE")
        task = perplexity_task(cfg.data, cfg.data_root)
    else:
        task = load_task(name, cfg.data_root)
    if cfg.chain_of_thought is not None:
        task.spec.prompt.chain_of_thought = cfg.chain_of_thought
    if cfg.max_new_tokens is not None:
        if cfg.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens={cfg.max_new_tokens} must be >= 1")
        task.spec.generation.max_new_tokens = cfg.max_new_tokens
    if task.spec.generation.seed is None:  # sampled answers are reproducible too
        task.spec.generation.seed = cfg.seed
    task.check_files()
    return task


def default_out(model: str) -> Path:
    path = Path(model)
    name = path.resolve().parent.name if path.name == "checkpoint" else path.name
    return Path("runs") / "evaluate" / f"{name or 'model'}.json"


def _write(report: dict[str, Any], cfg: EvaluateConfig, shots: list[int]) -> None:
    out = Path(cfg.out) if cfg.out else default_out(cfg.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report (per-example prompts and outputs included) -> {out}")
    curve = any(t["kind"] != "perplexity" for t in report["tasks"].values()) and len(shots) > 1
    if cfg.plot or curve:
        png = plot_shots_curve(report["tasks"], cfg.plot or out.with_suffix(".png"),
                               f"{default_out(cfg.model).stem}: score against shots")
        print(f"shots curve -> {png}")


# -- metric-only mode -----------------------------------------------------------------------------------------------
def _lines(path: str, what: str) -> list[str]:
    return read_text(path, f"{what} file").splitlines()


def score_files(cfg: EvaluateConfig) -> dict[str, Any]:
    """Score a predictions file against one or more line-aligned reference files."""
    if cfg.metric not in FILE_METRICS:
        raise UserError(f"unknown metric '{cfg.metric}'; use one of {', '.join(FILE_METRICS)}")
    if not cfg.predictions or not cfg.references:
        raise UserError(f"--metric {cfg.metric} needs --predictions FILE and --references FILE [FILE ...]")
    if cfg.out:
        check_can_write(cfg.out, "--out")
    predictions = _lines(cfg.predictions, "predictions")
    streams = [_lines(path, "references") for path in cfg.references]
    for path, stream in zip(cfg.references, streams, strict=True):
        if len(stream) != len(predictions):
            raise UserError(f"references file '{path}' has {len(stream)} lines but predictions has "
                            f"{len(predictions)}; they must be aligned line by line")
    references = [list(refs) for refs in zip(*streams, strict=True)]
    result = _file_scores(cfg, predictions, references)
    result.update(metric=cfg.metric, predictions=cfg.predictions, references=cfg.references, n=len(predictions))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"scores -> {cfg.out}")
    return result


def _file_scores(cfg: EvaluateConfig, predictions: list[str], references: list[list[str]]) -> dict[str, Any]:
    if cfg.metric == "rouge":
        corpus = metrics.rouge(predictions, references, cfg.stem)
        rows = [[kind, *(round(parts[p], 2) for p in ("precision", "recall", "fmeasure"))]
                for kind, parts in corpus.items()]
        print(format_table(["rouge", "precision", "recall", "f1"], rows))
        print(f"({len(predictions)} examples, {len(cfg.references)} reference(s) each, stemming {cfg.stem})")
        return {"rouge": corpus}
    if cfg.metric == "bleu":
        result = metrics.bleu(predictions, references)
        print(f"BLEU = {result['bleu']:.2f}  {result['signature']}")
        return {"bleu": result}
    if cfg.metric == "exact_match":
        score = metrics.exact_match(predictions, references)
        print(f"exact match = {score:.2f} ({len(predictions)} examples)")
        return {"exact_match": score}
    score = metrics.accuracy([p.strip() for p in predictions], [refs[0].strip() for refs in references])
    print(f"accuracy = {score:.2f} ({len(predictions)} examples)")
    return {"accuracy": score}
