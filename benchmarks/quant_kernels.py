"""Which int8 kernel should lmforge's quantized linears use on this CPU? Times one 768->3072 layer (GPT-2's MLP
up-projection) at 1 token (decode, a GEMV) and 8 tokens, fp32 F.linear against each candidate:

  fbgemm-dynamic    torch.ops.quantized.linear_dynamic over linear_prepack: int8 weights per output channel,
                    activations quantized per tensor on the fly (what quantize_dynamic does; 8-bit activations
                    where the CPU has VNNI, else 7-bit, see `full_range_activations`); lmforge's "int8-dynamic"
                    module adds its own Python around it, timed as its own row.
  int8pack-mm       aten._weight_int8pack_mm: int8 weights per channel, fp32 activations (weight-only).
  dequant+linear    de-quantize int8 weights to fp32, then F.linear (lmforge's "int8" weight-only forward).
  torchao-*         torchao's Int8DynamicActivationInt8WeightConfig / Int8WeightOnlyConfig through quantize_,
                    when torchao is importable (an optional measurement; lmforge does not depend on it).

Every candidate's output is compared with fp32 first (relative error printed), then each is timed over
`repeats` rounds (the rounds interleave the contenders, so load from other processes hits them alike) and the
median per call is reported; the ratio is fp32 time / candidate time (> 1: faster than fp32).

    python benchmarks/quant_kernels.py            # the measurement (1 thread, then all threads)
    python benchmarks/quant_kernels.py --quick    # smoke run: a small layer, few repetitions
    python benchmarks/quant_kernels.py --threads 1 --clock cpu   # a busy machine: one thread's CPU time
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import format_table, settle, write_results
from torch import nn

from lmforge.compress.quant import FORMATS, full_range_activations

Kernel = Callable[[torch.Tensor], torch.Tensor]


def int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def candidates(linear: nn.Linear) -> dict[str, Kernel]:
    weight, bias = linear.weight.detach(), linear.bias.detach()
    codes, scale = int8_per_channel(weight)
    dynamic = FORMATS["int8-dynamic"].from_linear(linear)
    packed, reduce_range = dynamic.packed(), not full_range_activations()
    weight_only = FORMATS["int8"].from_linear(linear)
    kernels: dict[str, Kernel] = {
        "fp32 F.linear": lambda x: F.linear(x, weight, bias),
        "fbgemm-dynamic": lambda x: torch.ops.quantized.linear_dynamic(x, packed, reduce_range),
        "lmforge int8-dynamic": dynamic,
        "int8pack-mm": lambda x: torch.ops.aten._weight_int8pack_mm(x, codes, scale) + bias,
        "lmforge int8 (dequant+linear)": weight_only,
    }
    kernels.update(torchao_candidates(linear))
    return kernels


def torchao_candidates(linear: nn.Linear) -> dict[str, Kernel]:
    if importlib.util.find_spec("torchao") is None:
        print("torchao is not installed: its rows are skipped (pip install torchao==0.18.0 --no-deps)")
        return {}
    with contextlib.redirect_stderr(io.StringIO()):  # it warns about CUDA-only extensions on a CPU build
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            quantize_,
        )
    found: dict[str, Kernel] = {}
    for name, config in (("torchao int8-dynamic", Int8DynamicActivationInt8WeightConfig()),
                         ("torchao int8-weight-only", Int8WeightOnlyConfig())):
        module = copy.deepcopy(linear)
        try:
            quantize_(module, config)
            module(torch.randn(1, linear.in_features))
        except Exception as exc:
            print(f"{name}: fails on torch {torch.__version__}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        found[name] = module
    return found


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def time_call(fn: Kernel, x: torch.Tensor, calls: int) -> float:
    start = clock()
    for _ in range(calls):
        fn(x)
    return (clock() - start) / calls


@torch.inference_mode()
def measure(d_in: int, d_out: int, tokens: int, kernels: dict[str, Kernel], repeats: int, calls: int,
            budget_s: float) -> list[list]:
    x = torch.randn(tokens, d_in)
    reference = kernels["fp32 F.linear"](x)
    errors = {name: float((fn(x) - reference).norm() / reference.norm()) for name, fn in kernels.items()}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    counts = {}
    for name, fn in kernels.items():  # warm-up (first-call packing, caches), then calls worth ~budget_s each
        time_call(fn, x, 2)
        counts[name] = max(2, min(calls, int(budget_s / max(time_call(fn, x, 3), 1e-7))))
    for _ in range(repeats):
        for name, fn in kernels.items():
            times[name].append(time_call(fn, x, counts[name]))
    fp32 = statistics.median(times["fp32 F.linear"])
    return [[tokens, name, statistics.median(t) * 1e6, fp32 / statistics.median(t), errors[name]]
            for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: a 64->256 layer, few repetitions")
    parser.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default: 1 and all)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="cpu: this process's CPU time (robust on a busy machine, meaningful with 1 thread)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    d_in, d_out = (64, 256) if args.quick else (768, 3072)
    repeats, calls, budget_s = (2, 5, 0.01) if args.quick else (7, 200, 0.1)
    threads = args.threads or ([1] if args.quick else sorted({1, torch.get_num_threads()}))
    torch.manual_seed(0)
    linear = nn.Linear(d_in, d_out)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02)
    kernels = candidates(linear)
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        for tokens in (1, 8):
            settle(not args.quick, max_wait_s=30)
            rows += [[n, *row] for row in measure(d_in, d_out, tokens, kernels, repeats, calls, budget_s)]
    headers = ["threads", "tokens", "kernel", "median us/call", "speed vs fp32", "rel. error"]
    print(f"{d_in}->{d_out} linear, torch {torch.__version__}, backend {torch.backends.quantized.engine}, "
          f"{args.clock} clock, {8 if full_range_activations() else 7}-bit dynamic activations")
    print(format_table(headers, rows))
    for n in threads:
        for tokens in (1, 8):
            ratios = ", ".join(f"{r[2]} {r[4]:.2f}x" for r in rows
                               if r[0] == n and r[1] == tokens and r[2] != "fp32 F.linear")
            print(f"ratio fp32/kernel, {n} thread(s), {tokens} token(s): {ratios}")
    write_results("quant_kernels", {"shape": [d_in, d_out], "quick": args.quick, "clock": args.clock,
                                    "rows": [dict(zip(headers, row, strict=True)) for row in rows]}, args.quick)


if __name__ == "__main__":
    main()
