"""Fill-in-the-middle on the stdlib corpus: is FIM "free" for left-to-right modelling, and what does it buy?

Two models, identical but for the objective: the same Llama-style shape, the same BPE tokenizer (it holds the FIM
tokens in both runs, so the vocabularies are equal), the same seed and the same number of steps on the same files;
one is pre-trained left-to-right, the other with `--objective fim --fim_rate 0.5 --fim_mode psm` (Bavarian et al.
2022). The last files of the shuffled stdlib are held out from both. Reported:

(a) left-to-right validation loss on the held-out files (Bavarian et al.: FIM at rate 0.5 costs no left-to-right
    loss), plus the loss on the same files with every document rearranged (PSM), where only the FIM model knows
    the format;
(b) single-line infilling on held-out functions: a function (parsed with `ast`, >= 3 body lines, small enough for
    the context) loses one non-trivial body line (not in its docstring, not a comment), the FIM model fills it from
    prefix and suffix; scored by exact match (stripped) and by whether the function still compiles;
(c) a left-to-right baseline that sees only the prefix: each model writes the next line, greedily.
An empty line is the floor of the compile rate (many functions still compile without the line).

    python benchmarks/fim.py            # the measurement (~10 min, 2 idle cores): benchmarks/results/fim.json, .md
    python benchmarks/fim.py --quick    # smoke run: tiny model, few steps, a handful of functions
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import re
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import format_table, results_dir, write_results

from lmforge.data import STDLIB, read_documents, resolve_files
from lmforge.data.fim import FimEncoder, add_fim_tokens
from lmforge.evaluate.metrics import perplexity
from lmforge.generate import SamplingConfig, generate_text, infill
from lmforge.interop import load
from lmforge.models import CausalLM
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_bpe
from lmforge.train import TrainConfig

RUN_DIR = Path("runs/fim-bench")
FULL = dict(model=dict(preset="small", context_length=256), vocab=2048, train_bytes=6_000_000,
            tokenizer_bytes=2_000_000, steps=900, batch_size=8, lr=2e-3, held_out_files=40, val_tokens=100_000,
            cases=150)
QUICK = dict(model=dict(preset="small", d_model=64, n_layers=2, n_heads=4, context_length=128), vocab=512,
             train_bytes=300_000, tokenizer_bytes=200_000, steps=30, batch_size=8, lr=3e-3, held_out_files=6,
             val_tokens=4_000, cases=8)
FIM_RATE, FIM_MODE = 0.5, "psm"
MAX_NEW = 48  # tokens for one line
CHUNK_CHARS = 800  # documents: definitions of at most this many characters (~230 tokens), so one FIM document fits
DEFINITION = re.compile(r"^\s*(def |async def |class |@)")


def code_chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """A source file as documents that fit a small context: cut before each def / class / decorator line (not right
    after a decorator), dedented; a longer piece is cut at line ends; scraps under 40 characters are dropped.

    Whole files are documents in `lmforge pretrain`, but a file is thousands of tokens: with a 256-token context
    a window would almost never hold a FIM document's <fim_suffix> part and its middle together."""
    pieces, current = [], []
    for line in text.splitlines(keepends=True):
        if DEFINITION.match(line) and current and not current[-1].lstrip().startswith("@"):
            pieces.append("".join(current))
            current = []
        current.append(line)
    pieces.append("".join(current))
    chunks = []
    for piece in map(textwrap.dedent, pieces):
        while piece:
            cut = piece.rfind("\n", 0, max_chars) + 1 if len(piece) > max_chars else len(piece)
            cut = cut or max_chars
            chunks.append(piece[:cut])
            piece = piece[cut:]
    return [c for c in chunks if len(c.strip()) >= 40]


def write_chunks(files: list[Path], path: Path) -> Path:
    """The files' chunks as a JSONL corpus (one document per line), the data both runs train on."""
    with path.open("w", encoding="utf-8") as sink:
        for doc in read_documents(files):
            for chunk in code_chunks(doc):
                sink.write(json.dumps({"text": chunk}) + "\n")
    return path


@dataclass(frozen=True)
class Case:
    where: str  # file:function
    prefix: str
    line: str
    suffix: str


def candidate_lines(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[int]:
    """Indices (into the function's lines) of non-trivial body lines: not the docstring, not comments, not blank."""
    first = node.lineno
    doc = node.body[0]
    skip_until = doc.end_lineno if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) else 0
    picks = []
    for number in range(node.body[0].lineno, node.end_lineno + 1):
        text = lines[number - first].strip()
        if number > skip_until and len(text) >= 8 and not text.startswith("#") and any(c.isalnum() for c in text):
            picks.append(number - first)
    return picks


def infill_cases(files: list[Path], tokenizer: Tokenizer, max_tokens: int, count: int, seed: int) -> list[Case]:
    """`count` (function, removed line) pairs from `files`, at most one per function, drawn with `seed`."""
    per_function = []
    for path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        all_lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                    or node.end_lineno - node.body[0].lineno < 2:  # fewer than 3 body lines
                continue
            lines = textwrap.dedent("\n".join(all_lines[node.lineno - 1:node.end_lineno])).splitlines()
            text = "\n".join(lines) + "\n"
            picks = candidate_lines(lines, node)
            if picks and len(tokenizer.encode(text)) <= max_tokens and _compiles(text):
                per_function.append((f"{path.name}:{node.name}", lines, picks))
    rng = random.Random(seed)
    cases = []
    for where, lines, picks in rng.sample(per_function, min(count, len(per_function))):
        k = rng.choice(picks)
        cases.append(Case(where, "\n".join(lines[:k]) + "\n", lines[k], "\n" + "\n".join(lines[k + 1:]) + "\n"))
    return cases


def _compiles(text: str) -> bool:
    try:
        compile(text, "<infill>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def first_line(text: str) -> str:
    return text.split("\n", 1)[0]


def score(cases: list[Case], predictions: list[str]) -> dict[str, float]:
    exact = [p.strip() == c.line.strip() for c, p in zip(cases, predictions, strict=True)]
    compiles = [_compiles(c.prefix + p + c.suffix) for c, p in zip(cases, predictions, strict=True)]
    return {"exact_match": float(np.mean(exact)), "compiles": float(np.mean(compiles))}


def predictions(model: CausalLM, tokenizer: Tokenizer, cases: list[Case], use_suffix: bool) -> list[str]:
    """One line per case: the infill between prefix and suffix, or the greedy next line after the prefix alone."""
    greedy = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW)
    if use_suffix:
        return [first_line(infill(model, tokenizer, c.prefix, c.suffix, greedy)) for c in cases]
    one_line = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW, stop=["\n"])
    return [first_line(generate_text(model, tokenizer, c.prefix, one_line)[0]) for c in cases]


def held_out_tokens(docs: list[str], tokenizer: Tokenizer, limit: int, fim: bool) -> list[int]:
    """The held-out documents as one EOS-separated stream (every one rearranged, PSM, when `fim`)."""
    encoded = FimEncoder(tokenizer, 1.0, FIM_MODE, seed=123)(docs) if fim else tokenizer.encode_batch(docs)
    stream = [t for ids in encoded for t in [*ids, tokenizer.eos_id]]
    return stream[:limit]


def train_one(name: str, spec: dict[str, Any], files: list[Path], run_dir: Path, fim: bool,
              reuse: bool) -> tuple[CausalLM, float | None]:
    """(model, training seconds); with `reuse`, the checkpoint an earlier run of this script left (seconds None)."""
    checkpoint = run_dir / name / "checkpoint"
    if reuse and (checkpoint / "config.json").is_file():
        return load(checkpoint)[0], None
    start = time.perf_counter()
    result = pretrain(PretrainConfig(
        out_dir=str(run_dir / name), overwrite=True,
        data=DataConfig(sources=[str(f) for f in files], max_bytes=spec["train_bytes"], val_fraction=0.01),
        tokenizer=TokenizerConfig(path=str(run_dir / "tokenizer")), model=dict(spec["model"]),
        train=TrainConfig(steps=spec["steps"], batch_size=spec["batch_size"], lr=spec["lr"], eval_every=0, seed=0,
                          warmup_steps=max(5, spec["steps"] // 20)),
        objective="fim" if fim else "auto", fim_rate=FIM_RATE, fim_mode=FIM_MODE))
    return result.model, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 30 steps, 8 functions")
    parser.add_argument("--steps", type=int, help=f"training steps of each model (default {FULL['steps']})")
    parser.add_argument("--reuse", action="store_true", help=f"evaluate the models a previous run left in {RUN_DIR}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spin-waiting on a busy machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = dict(QUICK if args.quick else FULL)
    spec["steps"] = args.steps or spec["steps"]
    files = resolve_files([STDLIB], 0)
    held_out, train_files = files[-spec["held_out_files"]:], files[:-spec["held_out_files"]]
    run_dir = Path(tempfile.mkdtemp(prefix="lmforge-fim-")) if args.quick else RUN_DIR
    if args.reuse and (run_dir / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(run_dir / "tokenizer")
    else:
        tokenizer = train_bpe(read_documents(train_files, max_bytes=spec["tokenizer_bytes"]), spec["vocab"],
                              DEFAULT_SPECIALS)
        add_fim_tokens(tokenizer, FIM_MODE)  # in both runs: equal vocabularies; the left-to-right run never sees them
        tokenizer.save(run_dir / "tokenizer")

    corpus = write_chunks(train_files, run_dir / "chunks.jsonl")
    runs = {name: train_one(name, spec, [corpus], run_dir, fim, args.reuse) for name, fim in
            (("left-to-right", False), ("fim", True))}
    context = runs["fim"][0].cfg.context_length
    docs = [chunk for doc in read_documents(held_out) for chunk in code_chunks(doc)]
    plain, rearranged = (held_out_tokens(docs, tokenizer, spec["val_tokens"], fim) for fim in (False, True))
    losses = {name: {"l2r_val_loss": perplexity(model, plain, context, context).nll,
                     "fim_format_val_loss": perplexity(model, rearranged, context, context).nll,
                     "train_s": seconds} for name, (model, seconds) in runs.items()}

    cases = infill_cases(held_out, tokenizer, context - MAX_NEW - 8, spec["cases"], seed=0)
    fim_model, l2r_model = runs["fim"][0], runs["left-to-right"][0]
    outputs = {
        "left-to-right model, prefix only": predictions(l2r_model, tokenizer, cases, use_suffix=False),
        "FIM model, prefix only": predictions(fim_model, tokenizer, cases, use_suffix=False),
        "FIM model, prefix + suffix (PSM infill)": predictions(fim_model, tokenizer, cases, use_suffix=True),
        "empty line (floor)": [""] * len(cases),
    }
    scores = {name: score(cases, out) for name, out in outputs.items()}
    report(spec, losses, scores, cases, outputs, args.quick)


def report(spec: dict[str, Any], losses: dict[str, dict[str, float]], scores: dict[str, dict[str, float]],
           cases: list[Case], outputs: dict[str, list[str]], quick: bool) -> None:
    loss_table = format_table(["model", "left-to-right val loss", "FIM-format val loss", "train s"],
                              [[n, v["l2r_val_loss"], v["fim_format_val_loss"], v["train_s"] or "reused"] for n, v in
                               losses.items()])
    infill_table = format_table(["single-line infilling", "exact match", "compiles"],
                                [[n, v["exact_match"], v["compiles"]] for n, v in scores.items()])
    cost = losses["fim"]["l2r_val_loss"] - losses["left-to-right"]["l2r_val_loss"]
    print(loss_table)
    print(f"FIM cost in left-to-right val loss: {cost:+.4f} nats/token")
    print(f"\n{len(cases)} held-out functions, one line removed each")
    print(infill_table)
    samples = [{"where": c.where, "line": c.line, **{n: out[i] for n, out in outputs.items() if "floor" not in n}}
               for i, c in enumerate(cases[:8])]
    for sample in samples[:3]:
        print(f"  {sample['where']}: true {sample['line'].strip()!r} | infill "
              f"{sample['FIM model, prefix + suffix (PSM infill)'].strip()!r}")
    payload = {"spec": spec, "fim_rate": FIM_RATE, "fim_mode": FIM_MODE, "losses": losses,
               "fim_cost_l2r_loss": cost, "infilling": scores, "cases": len(cases), "samples": samples}
    path = write_results("fim", payload, quick=quick)
    lines = ["# Fill-in-the-middle on the stdlib corpus", "", "```", loss_table, "```", "",
             f"FIM cost in left-to-right val loss: {cost:+.4f} nats/token", "", "```", infill_table, "```", "",
             "| function | removed line | left-to-right (prefix) | FIM infill |", "|---|---|---|---|"]
    lines += [f"| {s['where']} | {_code(s['line'])} | {_code(s['left-to-right model, prefix only'])} | "
              f"{_code(s['FIM model, prefix + suffix (PSM infill)'])} |" for s in samples]
    (results_dir(quick) / "fim.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def _code(text: str) -> str:
    """A line of code as a markdown table cell."""
    return f"`{text.strip()}`".replace("|", "\\|") if text.strip() else "(empty)"


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
