"""Compression measured: what each method costs in held-out perplexity and buys in bytes and decode speed.

Part 1, a trained model (`--model`; without it the script pre-trains one with `PRETRAIN_*` below, ~19 min on
2 cores, into runs/compress-bench and reuses its checkpoint afterwards). One row per result, all measured the same way
(`lmforge.recipes.compress_common.measure`): fp32, bf16, int8 weight-only, int8 with dynamic int8 activations (blocks
only, and with the head too), int4 RTN, GPTQ-4, GPTQ-3, NF4, magnitude and Wanda at 50% and 2:4 without and with
recovery fine-tuning, and a half-depth student distilled from the model against the same student trained from
scratch on the same tokens. Columns: bytes on disk, bytes/parameter, held-out perplexity (the tail of the corpus the
model never trained on), decode ms per token at batch 1 and 8 (greedy, KV cache; per sequence: a step's time).

Part 2, speed on a GPT-2-124M-shaped model (random weights scaled like benchmarks/decode.py so greedy output
varies): the same HF folder loaded by HF `transformers` (fp32 `generate`) and by lmforge, then lmforge quantized to
int8-dynamic (blocks; blocks + head); decode tokens/s at batch 1 and 8, ratios to HF.

    python benchmarks/compress.py --model runs/compress-bench/model   # the measurement (alone on the machine)
    python benchmarks/compress.py --quick                             # smoke run: tiny model, few steps
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import format_table, results_dir, settle, write_results
from decode import QUICK, WEIGHT_SCALE, scale_weights, through_hf_folder

from lmforge.config import ModelConfig
from lmforge.interop import load
from lmforge.models import CausalLM
from lmforge.recipes.compress_common import CompressData, decode_speed, measure
from lmforge.recipes.distill import DistillConfig, run_distill
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.recipes.prune import PruneConfig, run_prune
from lmforge.recipes.quantize import QuantizeConfig, run_quantize
from lmforge.train import TrainConfig

BENCH_RUN = Path("runs/compress-bench")  # the pre-training run; its model is BENCH_RUN/checkpoint
# The trained model: the demo's Llama-style block at 6 x 256 (5.9M parameters, 4k BPE vocabulary) on the stdlib.
PRETRAIN_MODEL = dict(preset="small", d_model=256, n_layers=6, n_heads=8)
PRETRAIN_TRAIN = dict(steps=2500, batch_size=16, lr=2e-3, eval_every=500)
QUICK_MODEL = dict(preset="small", d_model=64, n_layers=2, n_heads=4, context_length=64)
QUICK_TRAIN = dict(steps=40, batch_size=8, lr=3e-3, eval_every=0, warmup_steps=5)
QUICK_BYTES = 300_000
# Group size 64: it divides every width of the model (the SwiGLU hidden size of d=256 is 704, not a multiple of 128).
QUANT_ROWS: dict[str, dict[str, Any]] = {
    "bf16": dict(method="bf16"),
    "int8": dict(method="int8"),
    "int8-dynamic": dict(method="int8-dynamic"),
    "int8-dynamic+head": dict(method="int8-dynamic", include_head=True),
    "int4 RTN (g64)": dict(method="int4", bits=4, group_size=64),
    "GPTQ-4 (g64)": dict(method="gptq", bits=4, group_size=64),
    "int3 RTN (g64)": dict(method="int4", bits=3, group_size=64),
    "GPTQ-3 (g64)": dict(method="gptq", bits=3, group_size=64),
    "NF4": dict(method="nf4"),
}
PRUNE_ROWS: dict[str, dict[str, Any]] = {
    # Recovery is extra training: the dense model trained the same steps is the fair baseline for those rows.
    "dense": dict(method="magnitude", sparsity=0.0),
    "magnitude 50%": dict(method="magnitude", sparsity=0.5),
    "wanda 50%": dict(method="wanda", sparsity=0.5),
    "2:4 magnitude": dict(method="2:4", score="magnitude"),
    "2:4 wanda": dict(method="2:4", score="wanda"),
    "heads 25%": dict(method="heads", sparsity=0.25),
    "neurons 50%": dict(method="neurons", sparsity=0.5),
}
SECTIONS = ("quant", "prune", "distill", "gpt2")


def pretrained_model(args: argparse.Namespace) -> Path:
    """--model, or the benchmark's own model (trained once, then reused)."""
    if args.model:
        return Path(args.model)
    out = Path(tempfile.mkdtemp(prefix="lmforge-compress-quick-")) if args.quick else BENCH_RUN
    checkpoint = out / "checkpoint"
    if not (checkpoint / "config.json").is_file():
        model, train = (QUICK_MODEL, QUICK_TRAIN) if args.quick else (PRETRAIN_MODEL, PRETRAIN_TRAIN)
        data = DataConfig(max_bytes=QUICK_BYTES if args.quick else None)
        tokenizer = TokenizerConfig(vocab_size=512 if args.quick else 4096)
        pretrain(PretrainConfig(out_dir=str(out), data=data, tokenizer=tokenizer, model=dict(model),
                                train=TrainConfig(**train, progress=False), overwrite=True))
    return checkpoint


def compress_data(args: argparse.Namespace) -> CompressData:
    if args.quick:
        return CompressData(max_bytes=QUICK_BYTES, calibration_samples=8, heldout_tokens=1024, decode_tokens=8,
                            decode_batches=[1, 8])
    return CompressData(calibration_samples=args.calibration, heldout_tokens=args.heldout_tokens,
                        decode_tokens=args.decode_tokens, decode_batches=[1, 8])


def row(name: str, folder: Path, data: CompressData, note: str = "") -> dict[str, Any]:
    settle(data.decode_tokens >= 16)  # a measurement waits for an idle CPU; a --quick smoke run (8 tokens) does not
    model, tokenizer = load(folder)
    m = measure(model, tokenizer, data, folder)
    speeds = m["decode_tokens_per_s"]
    m["ms_per_token"] = {b: 1000 * int(b) / s for b, s in speeds.items() if s}
    print(f"  {name}: ppl {m['perplexity']:.3f}, {m['bytes_per_parameter']:.3f} B/param, "
          f"{', '.join(f'b{b} {ms:.2f} ms/token' for b, ms in m['ms_per_token'].items())}", flush=True)
    return {"name": name, "note": note, **m}


def quantized_rows(model: Path, work: Path, data: CompressData, only: set[str] | None,
                   quick: bool) -> list[dict[str, Any]]:
    """Each quantization method through `run_quantize`, measured as a user loads the folder."""
    rows = []
    for name, options in QUANT_ROWS.items():
        if only and name not in only:
            continue
        out = work / name.replace(" ", "_")
        if quick and "group_size" in options:  # the quick model is 64 wide
            options = {**options, "group_size": 32}
        start = time.perf_counter()
        run_quantize(QuantizeConfig(model=str(model), out=str(out), report=False, data=data, **options))
        rows.append({**row(name, out, data), "compress_seconds": time.perf_counter() - start})
        shutil.rmtree(out, ignore_errors=True)
    return rows


def pruned_rows(model: Path, work: Path, data: CompressData, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each pruning row without recovery, then (--recover-steps) with recovery fine-tuning, masks held."""
    rows = []
    for name, options in PRUNE_ROWS.items():
        for steps in (0, args.recover_steps) if args.recover_steps else (0,):
            if name == "dense" and not steps:
                continue  # that is the fp32 row
            label = f"{name} + {steps} steps" if steps else name
            if args.only and label not in args.only:
                continue
            out = work / label.replace(" ", "_").replace(":", "-").replace("%", "")
            train = TrainConfig(lr=1e-4, warmup_steps=10, batch_size=8, eval_every=0, eval_batches=4,
                                save_every_minutes=0, progress=False)
            start = time.perf_counter()
            run_prune(PruneConfig(model=str(model), out=str(out), report=False, data=data, recover_steps=steps,
                                  train=train, **options))
            rows.append({**row(label, out, data), "compress_seconds": time.perf_counter() - start})
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(f"{out}.recovery", ignore_errors=True)
    return rows


def distilled_rows(model: Path, work: Path, data: CompressData, args: argparse.Namespace) -> list[dict[str, Any]]:
    """A student of half the teacher's depth, distilled, against the same student trained from scratch on the same
    batches (the same data pipeline, seed and steps; only the loss differs)."""
    teacher, _ = load(model)
    shape = dict(d_model=teacher.cfg.d_model, n_layers=max(1, teacher.cfg.n_layers // 2),
                 n_heads=teacher.cfg.n_heads)
    steps = 20 if args.quick else args.distill_steps
    train = TrainConfig(steps=steps, batch_size=16 if not args.quick else 8, lr=2e-3, eval_every=0,
                        warmup_steps=min(100, steps // 10), progress=False)
    source = DataConfig(max_bytes=data.max_bytes)
    rows = []
    start = time.perf_counter()
    distilled = run_distill(DistillConfig(teacher=str(model), student="small", student_model=shape,
                                          out_dir=str(work / "distill"), alpha=args.alpha,
                                          temperature=args.temperature, data=source, train=train, report=False))
    rows.append({**row(f"distilled student ({distilled.student.cfg.n_layers} layers)", distilled.model_dir, data,
                       note=f"alpha {args.alpha}, T {args.temperature}, {steps} steps"),
                 "compress_seconds": time.perf_counter() - start})
    start = time.perf_counter()
    scratch = pretrain(PretrainConfig(out_dir=str(work / "scratch"), data=source,
                                      tokenizer=TokenizerConfig(path=str(model)),
                                      model=dict(distilled.student.cfg.to_dict()) | {"preset": "small"},
                                      train=train))
    rows.append({**row("same student from scratch", scratch.out_dir / "checkpoint", data,
                       note=f"cross-entropy only, same {steps} steps"),
                 "compress_seconds": time.perf_counter() - start})
    return rows


def table(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    headers = ["result", "on disk MiB", "bytes/param", "perplexity", "vs fp32", "sparsity", "ms/token b1",
               "ms/token b8"]
    lines = [[r["name"], r["bytes_on_disk"] / 2**20, r["bytes_per_parameter"], r["perplexity"],
              f"{r['perplexity'] / base['perplexity'] - 1:+.1%}", f"{r['block_sparsity']:.0%}",
              r["ms_per_token"].get("1", float("nan")), r["ms_per_token"].get("8", float("nan"))] for r in rows]
    return format_table(headers, lines)


def plot_quality_vs_bytes(rows: list[dict[str, Any]], png: Path) -> Path:
    """Held-out perplexity against the weights' bytes on disk, one labelled point per result, by kind."""
    from lmforge.plots import plt  # Agg backend, set once by lmforge.plots

    kinds = {"quantized": "o", "pruned": "s", "distilled / from scratch": "^"}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for kind, marker in kinds.items():
        points = [r for r in rows if _kind(r["name"]) == kind]
        ax.scatter([r["bytes_on_disk"] / 2**20 for r in points], [r["perplexity"] for r in points], marker=marker,
                   s=22, label=kind)
        for r in points:
            ax.annotate(r["name"], (r["bytes_on_disk"] / 2**20, r["perplexity"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.set_xlabel("weights on disk, MiB")
    ax.set_ylabel("held-out perplexity (log scale; lower is better)")
    ax.set_yscale("log")
    ax.set_title("compression: quality against size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def _kind(name: str) -> str:
    if name.startswith(("distilled", "same student")):
        return "distilled / from scratch"
    return "quantized" if name == "fp32" or name in QUANT_ROWS else "pruned"


# -- part 2: GPT-2-shaped decode speed against HF ------------------------------------------------------------------
def gpt2_speed(args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s of HF fp32, lmforge fp32 and lmforge int8-dynamic (blocks; blocks + head) at batch 1 and 8."""
    from lmforge.compress.quant import quantize_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("gpt2", **(QUICK if args.quick else {}))
    source = scale_weights(CausalLM(cfg), WEIGHT_SCALE)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf, _ = through_hf_folder(source, Path(tmp), runs=1)
    new = 8 if args.quick else args.gpt2_tokens
    prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    models: dict[str, Callable[[int], float]] = {}
    int8_blocks, int8_all = copy.deepcopy(ours), copy.deepcopy(ours)
    quantize_model(int8_blocks, "int8-dynamic")
    quantize_model(int8_all, "int8-dynamic", include_head=True)
    for name, model in (("lmforge fp32", ours), ("lmforge int8-dynamic", int8_blocks),
                        ("lmforge int8-dynamic+head", int8_all)):
        models[name] = lambda b, m=model: decode_speed(m, prompt, new, b, runs=args.runs) or 0.0
    models["hf fp32"] = lambda b: _hf_speed(hf, prompt, new, b, args.runs)
    speeds: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch in (1, 8):
        for name, speed in models.items():
            settle(not args.quick)
            speeds[name][str(batch)] = speed(batch)
    ratios = {name: {b: s / speeds["hf fp32"][b] for b, s in by_batch.items()} for name, by_batch in speeds.items()}
    return {"shape": "gpt2-quick" if args.quick else "gpt2", "new_tokens": new, "tokens_per_s": speeds,
            "ratio_to_hf": ratios, "parameters": ours.num_parameters()}


@torch.inference_mode()
def _hf_speed(hf: torch.nn.Module, prompt: list[int], new: int, batch: int, runs: int) -> float:
    ids = torch.tensor([prompt] * batch)

    def call() -> None:
        hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                    min_new_tokens=new, pad_token_id=hf.config.eos_token_id)

    call()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return batch * new / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="trained causal checkpoint (default: train the benchmark's own)")
    parser.add_argument("--calibration", type=int, default=128, help="calibration windows (GPTQ, Wanda)")
    parser.add_argument("--heldout-tokens", type=int, default=65536)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--gpt2-tokens", type=int, default=64, help="new tokens per GPT-2-shaped decode call")
    parser.add_argument("--runs", type=int, default=2, help="timed decode calls per model and batch (best counts)")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS,
                        help="parts to run; the results file keeps the other parts' last results")
    parser.add_argument("--only", nargs="*", default=None, help="quant/prune row names to run (default: all)")
    parser.add_argument("--recover-steps", type=int, default=100, help="recovery fine-tuning rows (0 = none)")
    parser.add_argument("--distill-steps", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.8, help="0.8 measured better than 0.5 (compress/distill.py)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny model trained for a few steps")
    args = parser.parse_args()
    if args.quick:
        args.recover_steps = min(args.recover_steps, 5)
    data = compress_data(args)
    model_folder = pretrained_model(args)
    payload = previous_results(args.quick)
    payload.update({"model": str(model_folder), "quick": args.quick, "data": vars(data)})
    work = Path(tempfile.mkdtemp(prefix="lmforge-compress-"))
    try:
        base = payload["fp32"] = row("fp32", model_folder, data)
        makers = {"quant": lambda: quantized_rows(model_folder, work, data, set(args.only or []) or None,
                                                    args.quick),
                  "prune": lambda: pruned_rows(model_folder, work, data, args),
                  "distill": lambda: distilled_rows(model_folder, work, data, args)}
        for section in [s for s in args.sections if s in makers]:
            payload[section] = makers[section]()
            write_results("compress", payload, quick=args.quick)  # each finished part is kept
    finally:
        shutil.rmtree(work, ignore_errors=True)
    every = [base, *(r for s in ("quant", "prune", "distill") for r in payload.get(s, []))]
    print(table(every, base))
    print(f"plot -> {plot_quality_vs_bytes(every, results_dir(args.quick) / 'compress.png')}")
    if "gpt2" in args.sections:
        payload["gpt2"] = speed = gpt2_speed(args)
        print(format_table(["gpt2-shaped", "tok/s b1", "tok/s b8", "vs HF b1", "vs HF b8"],
                           [[name, s["1"], s["8"], speed["ratio_to_hf"][name]["1"], speed["ratio_to_hf"][name]["8"]]
                            for name, s in speed["tokens_per_s"].items()]))
    path = write_results("compress", payload, quick=args.quick)
    print(f"results -> {path}")


def previous_results(quick: bool) -> dict[str, Any]:
    """The last results file's parts, so that a run of some --sections keeps the others."""
    path = results_dir(quick) / "compress.json"
    if not path.is_file():
        return {}
    kept = json.loads(path.read_text())
    return {k: v for k, v in kept.items() if k in SECTIONS}


if __name__ == "__main__":
    sys.exit(main())
