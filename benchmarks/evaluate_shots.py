"""Zero/one/few-shot scores of a model lmforge trains in minutes on this CPU, on the built-in task suite.

  1. pre-train a small Llama-style model (BPE 4096, d 128, 4 layers, context 512) on the *training /
     shot-pool* splits only: GSM8K train (question + worked answer), SST-2 train sentences (no labels),
     DialogSum dev (dialogue + summary), Multi30k val (English and German captions as separate lines);
  2. evaluate it with `lmforge.evaluate` on SST-2, PIQA (multiple choice by log-likelihood), GSM8K
     (exact match), DialogSum (ROUGE), Multi30k and WMT22 en-de (BLEU) at 0, 1 and 5 shots, and the
     shots curve 0/1/2/5/8 on the two classification tasks, with the time per example;
  3. perplexity of English news (WMT22 sources) with a sliding window against chopped windows.

Any Hugging Face folder given with --hf is evaluated the same way (none ships with this machine).

    python benchmarks/evaluate_shots.py               # the recorded run (~30 min on 2 busy cores)
    python benchmarks/evaluate_shots.py --quick       # smoke run: a tiny model, 2 examples a task, results to /tmp
    python benchmarks/evaluate_shots.py --model runs/x/checkpoint   # skip training, evaluate this one
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import BENCH_DIR, format_table, require_data, results_dir, settle, write_results

from lmforge.evaluate import data_root, evaluate_task, load_task, perplexity, plot_shots_curve
from lmforge.evaluate.scoring import encode
from lmforge.interop import load
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.train import TrainConfig

# (task, examples evaluated, shot counts)
PLAN = [
    ("sst2", 300, [0, 1, 2, 5, 8]),
    ("piqa", 300, [0, 1, 2, 5, 8]),
    ("gsm8k", 100, [0, 1, 5]),
    ("dialogsum", 60, [0, 1, 5]),
    ("multi30k-en-de", 100, [0, 1, 5]),
    ("wmt22-en-de", 60, [0, 1, 5]),
]
MODEL = {"preset": "small", "context_length": 512}
# --quick: every task and shot count of the plan's first three, on 2 examples, for a 2-layer, 64-wide model
# trained for 4 steps on 400 of the documents.
QUICK_EXAMPLES, QUICK_DOCS, QUICK_MODEL = 2, 400, {**MODEL, "d_model": 64, "n_layers": 2, "n_heads": 2}


def training_corpus(root: Path, out: Path, limit: int | None = None) -> Path:
    """The pools as JSONL documents (EOS between them in pre-training), never a test split; `limit`: the first
    that many after shuffling."""
    docs = [f"{r['question']}\n{r['answer']}" for r in _jsonl(root / "fewshot" / "gsm8k.train.jsonl")]
    docs += [line.partition(" ")[2] for line in (root / "sentiment" / "sst2.train.txt").read_text().splitlines()]
    docs += [f"{r['dialogue']}\n{r['summary']}" for r in _jsonl(root / "dialogsum" / "dialogsum.dev.jsonl")]
    for side in ("en", "de"):
        docs += (root / "translation" / f"multi30k.val.{side}").read_text().splitlines()
    random.Random(0).shuffle(docs)  # the validation tail then samples every source, not only German captions
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:limit] if d.strip()))
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_model(args: argparse.Namespace, work: Path) -> tuple[str, dict[str, Any]]:
    corpus = training_corpus(data_root(), work / "pools.jsonl", QUICK_DOCS if args.quick else None)
    start = time.perf_counter()
    run = pretrain(PretrainConfig(
        out_dir=str(work / "model"), overwrite=True, data=DataConfig(sources=[str(corpus)], val_fraction=0.02),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=512 if args.quick else 4096),
        model=QUICK_MODEL if args.quick else MODEL,
        train=TrainConfig(steps=args.steps, batch_size=8, lr=2e-3, warmup_steps=min(50, args.steps),
                          eval_every=args.steps, eval_batches=1 if args.quick else 20, log_every=50, progress=False),
    ))
    seconds = time.perf_counter() - start
    info = {"parameters": run.model.num_parameters(), "steps": args.steps, "train_s": round(seconds, 1),
            "tokens_seen": args.steps * 8 * 512, "corpus_bytes": corpus.stat().st_size,
            "val_loss": run.result.val_losses[-1][1] if run.result.val_losses else None}
    print(f"trained {info['parameters'] / 1e6:.2f}M parameters in {seconds:.0f} s, val loss {info['val_loss']}")
    return str(run.out_dir / "checkpoint"), info


def evaluate_model(path: str, args: argparse.Namespace, plan: list[tuple[str, int, list[int]]]) -> dict[str, Any]:
    model, tokenizer = load(path)
    tasks = {}
    for name, limit, shots in plan:
        settle(not args.no_settle)
        tasks[name] = evaluate_task(model, tokenizer, load_task(name), shots, limit, seed=1234, batch_size=8)
    return {"model": path, "parameters": model.num_parameters(), "tasks": tasks,
            "perplexity": news_perplexity(model, tokenizer, args)}


def news_perplexity(model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """WMT22 English sources (unseen news): a sliding window (stride context/4) against chopped windows."""
    text = (data_root() / "translation" / "wmt22.generaltest2022.en-de.src.en").read_text()
    ids = encode(tokenizer, text)[:args.ppl_tokens]
    context = model.cfg.context_length
    out = {}
    for name, stride in (("sliding", context // 4), ("chopped", context)):
        start = time.perf_counter()
        result = perplexity(model, ids, context, stride)
        out[name] = {**result.to_dict(), "seconds": round(time.perf_counter() - start, 2)}
    print(f"news perplexity: sliding {out['sliding']['perplexity']:.1f}, chopped {out['chopped']['perplexity']:.1f}")
    return out


def summary_rows(label: str, report: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for name, task in report["tasks"].items():
        for k, r in task["results"].items():
            chance = task.get("chance")
            rows.append([label, name, task["metric"], int(k), round(r["score"], 2),
                         "-" if chance is None else round(chance, 1), r["n"], round(r["mean_shots"], 2),
                         r["truncated"], round(r["seconds_per_example"], 3)])
    return rows


def strip_examples(report: dict[str, Any]) -> dict[str, Any]:
    """The committed JSON keeps scores and timings; per-example records stay in the run folder's report."""
    tasks = {name: {**task, "results": {k: {key: v for key, v in r.items() if key != "examples"}
                                        for k, r in task["results"].items()}}
             for name, task in report["tasks"].items()}
    return {**report, "tasks": tasks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500, help="pre-training steps (8 x 512 tokens each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: small models on a shared CPU)")
    parser.add_argument("--model", default=None, help="evaluate this checkpoint instead of training one")
    parser.add_argument("--hf", action="append", default=[], help="also evaluate this Hugging Face folder")
    parser.add_argument("--work", type=Path, default=None,
                        help="run folder (default runs/evaluate-bench; with --quick a temporary folder)")
    parser.add_argument("--ppl-tokens", type=int, default=20000, help="tokens of news for the perplexity check")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, to check the script runs")
    parser.add_argument("--no-settle", action="store_true", help="do not wait for an idle CPU before timing")
    args = parser.parse_args()
    require_data(data_root(), "put the shared data there or set $LMFORGE_DATA")
    plan = [(name, QUICK_EXAMPLES, shots[:3]) for name, _, shots in PLAN] if args.quick else PLAN
    scratch = args.quick and args.work is None
    if args.quick:
        args.steps, args.ppl_tokens, args.no_settle = 4, 600, True
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="evaluate-bench-")) if args.quick else Path("runs/evaluate-bench")
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    settle(not args.no_settle)
    path, training = (args.model, {}) if args.model else train_model(args, args.work)
    reports = {"lmforge-small": evaluate_model(path, args, plan)}
    for folder in args.hf:
        reports[Path(folder).name] = evaluate_model(folder, args, plan)
    rows = [row for label, report in reports.items() for row in summary_rows(label, report)]
    print("\n" + format_table(["model", "task", "metric", "shots", "score", "chance", "n", "shots used", "truncated",
                               "s/example"], rows))
    (args.work / "report.json").write_text(json.dumps(reports, indent=1) + "\n")
    params = reports["lmforge-small"]["parameters"] / 1e6
    png = plot_shots_curve(reports["lmforge-small"]["tasks"], results_dir(args.quick) / "evaluate_shots.png",
                           f"lmforge small ({params:.1f}M parameters, CPU-trained): score against shots")
    path = write_results("evaluate_shots", {
        "settings": {k: str(v) for k, v in vars(args).items()}, "training": training,
        "models": {k: strip_examples(v) for k, v in reports.items()},
        "plot": str(png.relative_to(BENCH_DIR.parent) if png.is_relative_to(BENCH_DIR.parent) else png)},
        quick=args.quick)
    print(f"results -> {path}, curve -> {png}")
    if scratch:
        shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
