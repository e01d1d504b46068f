"""Scale-out measured against the calculators (`lmforge estimate`), issue 15.

1. Memory: a GPT-2-small-shaped model (12 × 768, 8k vocabulary, 91.5M parameters) trains a few fp32 steps under
   1 process, DDP×2, ZeRO-1×2, FSDP-ZeRO-2×2 and FSDP-ZeRO-3×2 (gloo, launched with torchrun), each with and
   without activation checkpointing. Each rank reports its peak resident memory (VmHWM, reset after the first
   optimizer step so the peak is a steady-state step's, with Adam's moments allocated) minus its resident memory
   before the model was built; the table sets it beside the calculator's per-device peak
   (`lmforge.estimate.per_device_memory`) and the seeds' 24 bytes/parameter rule. glibc's malloc runs with a fixed
   mmap threshold (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the system and the resident set follows
   the live tensors; memory is not distorted by a busy CPU.
2. Throughput: tokens/s of DDP×2 (one thread per rank) against 1 process (two threads) on the same per-rank
   micro-batch. On a 2-core CPU the two runs share the same cores, so the ratio mostly measures DDP's communication
   (gloo all-reduce) and synchronisation overhead, not a speed-up. Timing needs a quiet machine.
3. GPU (only where CUDA is present): MFU of a GPT-2-124M-shaped model training in bf16, and its peak
   `torch.cuda.max_memory_allocated` against the calculator.

    python benchmarks/scale.py --quick            # smoke run: a tiny model, 1 process and DDP×2, a few steps
    python benchmarks/scale.py                    # all parts → benchmarks/results/scale.json and scale.md
    python benchmarks/scale.py --parts throughput # one part (memory, throughput, gpu)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import format_table, results_dir, write_results

from lmforge import estimate as est
from lmforge.config import ModelConfig
from lmforge.models import CausalLM
from lmforge.train import TrainConfig, train

SCRIPT = Path(__file__).resolve()
# GPT-2 small's blocks with an 8k vocabulary and 256-token context: 91.5M parameters, ~1.5 GB of fp32 AdamW state.
MEMORY_MODEL = dict(preset="gpt2", vocab_size=8192, context_length=256)
MEMORY_RUN = dict(batch_size=4, steps=3)
THROUGHPUT_MODEL = dict(preset="gpt2", vocab_size=8192, context_length=256, d_model=384, n_layers=6, n_heads=6)
THROUGHPUT_RUN = dict(batch_size=8, steps=12)
QUICK_MODEL = dict(preset="tiny", context_length=64)
QUICK_RUN = dict(batch_size=4, steps=3)
MEMORY_MODES = [("none", 1), ("ddp", 2), ("zero1", 2), ("zero3", 2), ("zero2", 2)]
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
GB = 1e9


# -- the measured run (one process per rank) -----------------------------------------------------------------


def status_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Make VmHWM start again from the current resident set (Linux: 5 > /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class StepClock:
    """on_step hook: resets the peak after the first optimizer step and times the steps after it."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.end = 0.0
        self.cuda = torch.cuda.is_available()

    def __call__(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        if step == 1:
            reset_peak()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def random_batches(cfg: ModelConfig, batch_size: int):
    """Micro-batch i: random token windows drawn from a generator seeded by i (a pure function of i)."""
    def batches(i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return batches


def worker(args: argparse.Namespace) -> None:
    """Train the model a few steps under args.mode and write this rank's peak memory and speed to args.out."""
    torch.set_num_threads(args.threads)
    device = "cuda" if args.cuda else "cpu"
    spec = json.loads(args.model)
    cfg = ModelConfig.from_preset(spec.pop("preset"), **spec)
    baseline_kb = status_kb("VmRSS")
    torch.manual_seed(0)
    model = CausalLM(cfg)
    clock = StepClock()
    run = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup_steps=0, eval_every=0,
                      log_every=args.steps, save_every_minutes=0, progress=False, device=device,
                      precision=args.precision, distributed=args.mode, activation_checkpointing=args.ckpt)
    train(model, random_batches(cfg, args.batch_size), run, on_step=clock)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    seconds = clock.end - (clock.start or clock.end)
    tokens = (args.steps - 1) * args.batch_size * cfg.context_length * world
    result = {"rank": rank, "world": world, "peak_bytes": (status_kb("VmHWM") - baseline_kb) * 1024,
              "baseline_bytes": baseline_kb * 1024, "tokens_per_s": tokens / seconds if seconds else None,
              "cuda_peak_bytes": torch.cuda.max_memory_allocated() if args.cuda else None}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))


# -- launching and predicting -----------------------------------------------------------------------------------


def launch(model: dict[str, Any], run: dict[str, int], mode: str, world: int, ckpt: bool, threads: int,
           precision: str = "fp32", cuda: bool = False) -> list[dict[str, Any]]:
    """One measured run: torchrun with `world` ranks (a plain process for world 1); each rank's report."""
    with tempfile.TemporaryDirectory(prefix="lmforge-scale-") as out:
        worker_args = ["--worker", "--mode", mode, "--model", json.dumps(model), "--out", out,
                       "--steps", str(run["steps"]), "--batch_size", str(run["batch_size"]),
                       "--threads", str(threads), "--precision", precision, *(["--ckpt"] if ckpt else []),
                       *(["--cuda"] if cuda else [])]
        launcher = ([sys.executable] if world == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"])
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([*launcher, str(SCRIPT), *worker_args], env=env, capture_output=True, text=True,
                              timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{mode}×{world} failed:\n{done.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob("rank*.json"))]


def predicted_peak(cfg: ModelConfig, mode: str, world: int, batch_size: int, ckpt: bool,
                   precision: str = "fp32") -> dict[str, float]:
    """The calculator's per-device bytes for this run (see `lmforge.estimate.per_device_memory`)."""
    memory = est.model_memory(cfg, "full", precision)
    activations = est.activation_bytes(cfg, batch_size, cfg.context_length, precision, ckpt)["total"]
    activations += est.logits_gradient_bytes(cfg, batch_size, cfg.context_length)
    gathered, buffers = est.lmforge_sharding(cfg, memory, mode, world)
    return est.per_device_memory(memory, activations, world, mode, gathered, buffers)


def memory_part(model: dict[str, Any], run: dict[str, int], modes: list[tuple[str, int]],
                checkpointing: tuple[bool, ...] = (False, True)) -> list[dict[str, Any]]:
    spec = dict(model)
    cfg = ModelConfig.from_preset(spec.pop("preset"), **spec)
    n = est.count_parameters(cfg)
    rows = []
    for mode, world in modes:
        for ckpt in checkpointing:
            ranks = launch(model, run, mode, world, ckpt, threads=2 if world == 1 else 1)
            measured = max(r["peak_bytes"] for r in ranks)
            predicted = predicted_peak(cfg, mode, world, run["batch_size"], ckpt)
            rows.append({"mode": mode, "world": world, "checkpointing": ckpt, "parameters": n,
                         "measured_bytes": measured, "per_rank_bytes": [r["peak_bytes"] for r in ranks],
                         "predicted_peak_bytes": predicted["peak"], "predicted_total_bytes": predicted["total"],
                         "predicted": predicted, "error": predicted["peak"] / measured - 1,
                         "seeds_24_bytes": 24 * n, "seeds_24_bytes_error": 24 * n / measured - 1})
            print(f"  {mode}×{world}{' +ckpt' if ckpt else ''}: measured {measured / GB:.3f} GB, predicted "
                  f"{predicted['peak'] / GB:.3f} GB ({rows[-1]['error']:+.1%}), seeds' 24 B/param "
                  f"{24 * n / GB:.3f} GB", flush=True)
    return rows


def throughput_part(model: dict[str, Any], run: dict[str, int]) -> dict[str, Any]:
    single = launch(model, run, "none", 1, False, threads=2)[0]["tokens_per_s"]
    ddp = launch(model, run, "ddp", 2, False, threads=1)[0]["tokens_per_s"]
    print(f"  tokens/s: 1 process (2 threads) {single:,.0f}, DDP×2 (1 thread each) {ddp:,.0f}, ratio "
          f"{ddp / single:.2f}", flush=True)
    return {"single_tokens_per_s": single, "ddp2_tokens_per_s": ddp, "ratio": ddp / single}


def gpu_part() -> dict[str, Any] | None:
    """MFU of a GPT-2-124M-shaped model in bf16 on one GPU; None without CUDA."""
    if not torch.cuda.is_available():
        print("  gpu: skipped (no CUDA device)", flush=True)
        return None
    model, run = dict(preset="gpt2"), dict(batch_size=8, steps=20)
    report = launch(model, run, "none", 1, False, threads=4, precision="bf16", cuda=True)[0]
    cfg = ModelConfig.from_preset("gpt2")
    name = torch.cuda.get_device_name()
    peak = est.peak_flops(torch.device("cuda"))
    mfu = report["tokens_per_s"] * est.flops_per_token(cfg, cfg.context_length) / peak
    predicted = predicted_peak(cfg, "none", 1, run["batch_size"], False, precision="fp32")
    print(f"  gpu {name}: {report['tokens_per_s']:,.0f} tokens/s, MFU {mfu:.1%} of {peak / 1e12:.0f} TFLOP/s; "
          f"max_memory_allocated {report['cuda_peak_bytes'] / GB:.2f} GB", flush=True)
    return {"device": name, "tokens_per_s": report["tokens_per_s"], "mfu": mfu, "peak_flops": peak,
            "max_memory_allocated": report["cuda_peak_bytes"], "predicted_fp32_states_peak": predicted["peak"]}


# -- report -----------------------------------------------------------------------------------------------------


def markdown(memory: list[dict[str, Any]], throughput: dict[str, Any] | None, gpu: dict[str, Any] | None) -> str:
    lines = []
    if memory:
        n = memory[0]["parameters"]
        lines += [f"Peak resident memory per rank, fp32 AdamW, a {n / 1e6:.1f}M-parameter GPT-2-shaped model "
                  "(gloo, 2 processes under torchrun), against `lmforge estimate`'s per-device peak and the seeds' "
                  "24 bytes/parameter; measured = VmHWM after the first step minus the resident set before the "
                  "model was built (it includes ~0.1 GB per process of torch's own: code, thread pools, gloo).", ""]
        rows = [(f"{r['mode']}×{r['world']}", "yes" if r["checkpointing"] else "no", f"{r['measured_bytes'] / GB:.3f}",
                 f"{r['predicted_peak_bytes'] / GB:.3f}", f"{r['error']:+.1%}", f"{r['seeds_24_bytes'] / GB:.3f}",
                 f"{r['seeds_24_bytes_error']:+.1%}") for r in memory]
        head = ["run", "activation checkpointing", "measured peak GB/rank", "calculator GB", "error",
                "seeds' 24 B/param GB", "24 B/param error"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                  *("| " + " | ".join(row) + " |" for row in rows), ""]
    if throughput:
        lines.append(f"Throughput: 1 process {throughput['single_tokens_per_s']:,.0f} tokens/s, DDP×2 "
                     f"{throughput['ddp2_tokens_per_s']:,.0f} tokens/s (ratio {throughput['ratio']:.2f}).")
    if gpu:
        lines.append(f"GPU {gpu['device']}: {gpu['tokens_per_s']:,.0f} tokens/s, MFU {gpu['mfu']:.1%}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 process and DDP×2, a few steps")
    parser.add_argument("--parts", nargs="+", default=["memory", "throughput", "gpu"],
                        choices=["memory", "throughput", "gpu"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name, default in (("--mode", "none"), ("--model", "{}"), ("--out", "."), ("--precision", "fp32")):
        parser.add_argument(name, default=default, help=argparse.SUPPRESS)
    for name in ("--steps", "--batch_size", "--threads"):
        parser.add_argument(name, type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cuda", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        memory, throughput, gpu = memory_part(QUICK_MODEL, QUICK_RUN, [("none", 1), ("ddp", 2)], (False,)), None, None
    else:
        print("memory (fp32 AdamW, per rank):", flush=True)
        memory = memory_part(MEMORY_MODEL, MEMORY_RUN, MEMORY_MODES) if "memory" in args.parts else []
        print("throughput (timing: run alone on the machine):", flush=True)
        throughput = throughput_part(THROUGHPUT_MODEL, THROUGHPUT_RUN) if "throughput" in args.parts else None
        gpu = gpu_part() if "gpu" in args.parts else None
    payload = {"memory": memory, "throughput": throughput, "gpu": gpu,
               "model": QUICK_MODEL if args.quick else MEMORY_MODEL, "malloc_env": MALLOC_ENV}
    previous = results_dir(args.quick) / "scale.json"
    if not args.quick and previous.is_file():  # a run of some parts keeps the others' recorded results
        kept = json.loads(previous.read_text())
        payload.update({part: kept.get(part) for part in ("memory", "throughput", "gpu") if part not in args.parts})
    memory, throughput, gpu = payload["memory"] or [], payload["throughput"], payload["gpu"]
    path = write_results("scale", payload, quick=args.quick)
    table = markdown(memory, throughput, gpu)
    (results_dir(args.quick) / "scale.md").write_text(table)
    print(format_table(["run", "checkpointing", "measured GB/rank", "calculator GB", "error"],
                       [(f"{r['mode']}×{r['world']}", "yes" if r["checkpointing"] else "no", r["measured_bytes"] / GB,
                         r["predicted_peak_bytes"] / GB, f"{r['error']:+.1%}") for r in memory]))
    print(table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
