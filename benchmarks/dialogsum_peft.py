"""Full fine-tuning vs parameter-efficient methods on DialogSum, in one run on this machine.

The base is a small causal model pre-trained here (`lmforge pretrain`) on the text of DialogSum's dev
dialogues and summaries, or any checkpoint / Hugging Face folder given with --model. Every method then
fine-tunes it (`lmforge finetune --method ...`, same steps and batch) on dev prompt -> summary pairs and
is scored with ROUGE-1/2/L on the first --limit dialogues of the test set (three references each),
through the `dialogsum` evaluation task: the training prompts are that task's own zero-shot prompts.

  zero-shot   the base, no fine-tuning
  full        every weight trains
  lora        rank-8 updates on every projection (q k v o gate up down)
  qlora       the same LoRA over a frozen NF4 base (block 64, double quantization)
  prompt      20 trainable virtual tokens
  lora-qv     rank-8 updates on q and v only (peft's default targets)
  prefix      20 trainable key/value prefixes in every layer
  adapter     bottleneck adapters (width 16) after every attention and MLP

For each: trainable parameters, the bytes of weights + gradients + AdamW moments the run holds
(measured from the tensors), the process's peak RSS while training, seconds per step, and the
perplexity on held-out dev dialogues (the pre-training distribution) before and after fine-tuning,
which shows how much each method forgets.

    python benchmarks/dialogsum_peft.py               # the recorded run (~20 min on 2 cores)
    python benchmarks/dialogsum_peft.py --quick       # smoke run: 40 dialogues, full + lora, results to /tmp
    python benchmarks/dialogsum_peft.py --model runs/my-model/checkpoint --limit 200
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import SHARED_DATA, format_table, require_data, settle, write_results
from torch import nn

from lmforge.evaluate import Task, evaluate_task, load_task
from lmforge.evaluate.prompts import build_prompt
from lmforge.interop import load, load_adapter
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.train import TrainConfig

DIALOGSUM = SHARED_DATA / "dialogsum"
HELD_OUT = 50  # dev dialogues kept out of pre-training and fine-tuning: the forgetting probe
QUICK_POOL, QUICK_HELD_OUT = 40, 8  # --quick: dev dialogues used, of which held out
METHODS: dict[str, tuple[float, list[str]]] = {  # name: (learning rate, `lmforge finetune` flags of the method)
    "full": (3e-4, ["--method", "full"]),
    "lora": (2e-3, ["--method", "lora", "--peft.r", "8", "--peft.alpha", "16", "--peft.targets", "all"]),
    "qlora": (2e-3, ["--method", "qlora", "--peft.r", "8", "--peft.alpha", "16", "--peft.targets", "all",
                     "--peft.double_quant", "true"]),
    "prompt": (3e-2, ["--method", "prompt", "--peft.n_tokens", "20"]),
    "lora-qv": (2e-3, ["--method", "lora", "--peft.r", "8", "--peft.alpha", "16", "--peft.targets", "q", "v"]),
    "prefix": (1e-2, ["--method", "prefix", "--peft.n_tokens", "20"]),
    "adapter": (2e-3, ["--method", "adapter", "--peft.bottleneck", "16"]),
}


def split_dev(task: Task, work: Path, quick: bool = False) -> tuple[Path, Path, Path, Path]:
    """(pre-training text, fine-tuning JSONL, held-out JSONL, held-out text) from the dev set; the prompts
    are the `dialogsum` task's zero-shot prompts, the completions ' <summary>'."""
    pool, held_out = task.pool(), HELD_OUT
    if quick:
        pool, held_out = pool[:QUICK_POOL], QUICK_HELD_OUT
    train, held = pool[:-held_out], pool[-held_out:]
    corpus = work / "pretrain.txt"
    corpus.write_text("".join(f"{ex.fields['dialogue']}\n{ex.answer}\n\n" for ex in train), encoding="utf-8")
    held_text = work / "held_out.txt"
    held_text.write_text("".join(f"{ex.fields['dialogue']}\n{ex.answer}\n\n" for ex in held), encoding="utf-8")
    files = []
    for name, examples in (("train.jsonl", train), ("held_out.jsonl", held)):
        rows = [{"prompt": build_prompt(task.spec.prompt, ex, []).text, "completion": " " + ex.answer}
                for ex in examples]
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files.append(work / name)
    return corpus, files[0], files[1], held_text


BASE_MODEL = {"preset": "small", "context_length": 512, "d_model": 192, "n_layers": 4, "n_heads": 6}
QUICK_MODEL = {**BASE_MODEL, "d_model": 64, "n_layers": 2, "n_heads": 2}


def pretrain_base(corpus: Path, work: Path, steps: int, quick: bool = False) -> Path:
    run = pretrain(PretrainConfig(
        out_dir=str(work / "base"), overwrite=True,
        data=DataConfig(sources=[str(corpus)], val_fraction=0.05),
        tokenizer=TokenizerConfig(vocab_size=512 if quick else 4096),
        model=QUICK_MODEL if quick else BASE_MODEL,
        train=TrainConfig(steps=steps, batch_size=2 if quick else 8, lr=2e-3, warmup_steps=max(steps // 20, 1),
                          eval_every=steps if quick else max(steps // 4, 1), eval_batches=1 if quick else 20,
                          log_every=50, progress=False),
    ))
    return run.out_dir / "checkpoint"


def finetune_args(name: str, base: Path, train_file: Path, held_file: Path, held_text: Path, out: Path,
                  steps: int, batch_size: int = 8, eval_batches: int = 7) -> list[str]:
    """The `lmforge` command line (after the program) that fine-tunes `base` with method `name`."""
    lr, flags = METHODS[name]
    return ["finetune", "--model", str(base), *flags, "--task", "instruct",
            "--data", str(train_file), "--eval_file", str(held_file), "--forgetting_data", str(held_text),
            "--out_dir", str(out), "--overwrite", "true", "--max_length", "512", "--train.steps", str(steps),
            "--train.batch_size", str(batch_size), "--train.lr", str(lr), "--train.warmup_steps", "20",
            "--train.weight_decay", "0", "--train.eval_every", str(max(steps // 3, 1)),
            "--train.eval_batches", str(eval_batches), "--train.progress", "false"]


def check_args(args: list[str]) -> None:
    """Parse a command line into its config as the CLI would, without running it (--quick, for the methods
    it does not run): a renamed flag or an invalid value fails here."""
    from lmforge.cli import build_parser
    from lmforge.options import parse

    namespace = build_parser().parse_args(args)
    parse(namespace.handler[0], namespace)


def finetune_cli(name: str, args: list[str], out: Path) -> dict[str, Any]:
    """One `lmforge finetune` in its own process, so each method's peak RSS starts from the same clean slate."""
    command = [sys.executable, "-m", "lmforge.cli", *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} fine-tuning failed:\n{done.stderr}")
    print("\n".join(line for line in done.stdout.splitlines() if not line.startswith("step")), flush=True)
    return json.loads((out / "eval.json").read_text())


def fine_tuned(name: str, base: Path, out: Path) -> tuple[nn.Module, Any]:
    """The full fine-tune's own checkpoint, or the base with the method's saved tensors loaded onto it."""
    if name == "full":
        return load(str(out / "checkpoint"))
    model, tokenizer = load(str(base))
    return load_adapter(model, out / "checkpoint"), tokenizer


def state_bytes(model: nn.Module) -> int:
    """Weights and buffers as stored (NF4 codes for QLoRA) plus, per trainable parameter, its gradient and
    AdamW's two moments, all in the parameter's dtype."""
    stored = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return stored + sum(3 * p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def rouge(model: nn.Module, tokenizer: Any, task: Task, limit: int) -> dict[str, float]:
    report = evaluate_task(model.eval(), tokenizer, task, shots=(0,), limit=limit, batch_size=8, log=None)
    return report["results"]["0"]["scores"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DIALOGSUM, help="folder holding dialogsum.{dev,test}.jsonl")
    parser.add_argument("--model", default=None, help="start from this checkpoint/HF folder instead of pre-training")
    parser.add_argument("--pretrain-steps", type=int, default=500)
    parser.add_argument("--finetune-steps", type=int, default=200)
    parser.add_argument("--limit", type=int, default=100, help="test dialogues scored")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="methods to run (default: all; with --quick: full and lora, the others' command lines "
                             "are only parsed)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 40 dev dialogues, tiny budgets, 2 test dialogues; results to a temp folder")
    parser.add_argument("--no-settle", action="store_true", help="do not wait for an idle CPU before timing")
    args = parser.parse_args()
    batch_size, eval_batches, summary_tokens = 8, 7, 48
    if args.quick:
        args.pretrain_steps, args.finetune_steps, args.limit, args.no_settle = 4, 3, 2, True
        batch_size, eval_batches, summary_tokens = 2, 1, 8
    args.methods = args.methods or (["full", "lora"] if args.quick else list(METHODS))
    for split in ("dev", "test"):
        require_data(args.data / f"dialogsum.{split}.jsonl", "pass --data to DialogSum's folder")

    work = Path(tempfile.mkdtemp(prefix="dialogsum-bench-"))
    task = load_task("dialogsum", root=args.data.parent)  # dev for training, test for scoring
    task.spec.generation.max_new_tokens = summary_tokens
    corpus, train_file, held_file, held_text = split_dev(task, work, args.quick)
    settle(not args.no_settle)
    start = time.perf_counter()
    base = Path(args.model) if args.model else pretrain_base(corpus, work, args.pretrain_steps, args.quick)
    pretrain_s = 0.0 if args.model else time.perf_counter() - start

    model, tokenizer = load(str(base))
    results: dict[str, dict[str, Any]] = {"zero-shot": {"rouge": rouge(model, tokenizer, task, args.limit)}}
    print(f"zero-shot: {results['zero-shot']['rouge']}")
    for name in METHODS:
        command = finetune_args(name, base, train_file, held_file, held_text, work / name, args.finetune_steps,
                                batch_size, eval_batches)
        if name not in args.methods:
            if args.quick:
                check_args(command)
            continue
        settle(not args.no_settle)
        report = finetune_cli(name, command, work / name)
        model, tokenizer = fine_tuned(name, base, work / name)
        results[name] = {
            "rouge": rouge(model, tokenizer, task, args.limit), "state_bytes": state_bytes(model),
            **{k: report[k] for k in ("trainable_parameters", "total_parameters", "peak_memory_bytes",
                                      "seconds_per_step", "val_losses", "forgetting")}}
        print(f"{name}: {results[name]['rouge']}")

    print("\n" + format_table(
        ["method", "ROUGE-1", "ROUGE-2", "ROUGE-L", "trainable", "% of total", "state MiB", "peak RSS MiB",
         "s/step", "held-out ppl before -> after"], [_row(name, r) for name, r in results.items()]))
    path = write_results("dialogsum_peft", {
        "settings": vars(args) | {"data": str(args.data), "base": str(args.model or "pre-trained here")},
        "pretrain_s": pretrain_s, "results": results}, quick=args.quick)
    print(f"\nwrote {path}")
    if args.quick:
        shutil.rmtree(work)


def _row(name: str, r: dict[str, Any]) -> list[Any]:
    scores = [r["rouge"][k] for k in ("rouge1", "rouge2", "rougeL")]
    if "trainable_parameters" not in r:
        return [name, *scores, 0, 0.0, "-", "-", "-", "-"]
    forgetting = r["forgetting"]
    return [name, *scores, f"{r['trainable_parameters']:,}",
            100 * r["trainable_parameters"] / r["total_parameters"], r["state_bytes"] / 2**20,
            r["peak_memory_bytes"] / 2**20, r["seconds_per_step"],
            f"{forgetting['perplexity_before']:.2f} -> {forgetting['perplexity_after']:.2f}"]


if __name__ == "__main__":
    main()
