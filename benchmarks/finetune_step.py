"""One fine-tuning step (forward + backward + AdamW) of lmforge vs transformers + peft, on the same weights.

Shape: a 6-layer Llama (d_model 384, 6 heads of 64, SwiGLU hidden 1024, RMSNorm, RoPE, untied head, vocab
2048), batch 8 x 256 tokens, fp32, on this machine's CPU threads. lmforge builds the base model and writes
it with `lmforge.interop.save_hf`; transformers loads that folder (LlamaForCausalLM, sdpa attention).

  lora   rank 8, alpha 16, dropout 0 on all seven projections (q k v o gate up down). lmforge:
         apply_method("lora"). The peer: peft on the transformers model with the very same adapter, written
         by `lmforge.interop.save_peft_adapter` and read by `peft.PeftModel.from_pretrained(is_trainable=True)`
         (its LoraConfig is checked: r=8, lora_alpha=16, the seven target modules, lora_dropout=0).
         B starts small and random rather than zero, so that every LoRA tensor gets a gradient.
  qlora  the same adapter over a frozen NF4 base (block 64, double quantization). The peer is transformers +
         bitsandbytes (load_in_4bit, nf4, double quant, fp32 compute; CPU support since bitsandbytes 0.46) +
         peft, when bitsandbytes is importable. Without it the row's peer is the lora row's HF + peft model
         on the float base (marked "hf+peft lora, float base"): what that costs, not a like-for-like QLoRA.
         The two sides' NF4 weights are not bit-identical (their double quantization of the block scales
         differs), so their losses agree to the quantization error only.
  full   every weight trains.

Both sides: one optimizer, torch's fused AdamW with lmforge's groups (decay on matrices only; lr 1e-3),
the same random token batches, mean cross-entropy in fp32. Before timing, each pair's losses are compared on
the first batch and again after --check-steps optimizer steps, so gradients and updates agree too.
Rounds are interleaved (lora lmforge, lora peer, qlora lmforge, ...) so that load from other processes hits
every contender alike; each round runs `warmup` untimed and `steps` timed steps per contender, after
waiting for an idle CPU. The ratio is speed: the peer's median step time over lmforge's (> 1: lmforge faster).

    python benchmarks/finetune_step.py             # the measurement
    python benchmarks/finetune_step.py --quick     # smoke run: tiny shapes, both sides, the checks, seconds
    python benchmarks/finetune_step.py --profile   # + torch.profiler op tables per contender
    python benchmarks/finetune_step.py --threads 1 --clock cpu   # a busy machine: one thread's CPU time per step
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import format_table, settle, write_results
from torch import nn

from lmforge.config import ModelConfig
from lmforge.interop import save_hf, save_peft_adapter
from lmforge.models import CausalLM
from lmforge.peft import apply_method, describe, lora_state
from lmforge.train.optim import make_adamw

SHAPES = {  # the measurement, and --quick's tiny model
    "full": dict(model=dict(vocab_size=2048, context_length=256, d_model=384, n_layers=6, n_heads=6, d_ff=1024),
                 batch=8, seq=256),
    "quick": dict(model=dict(vocab_size=256, context_length=32, d_model=64, n_layers=2, n_heads=4, d_ff=128),
                  batch=2, seq=32),
}
LLAMA = dict(norm="rmsnorm", mlp="swiglu", positions="rope", tie_embeddings=False, attention_bias=False,
             mlp_bias=False, norm_bias=False)
RANK, ALPHA, LR, WEIGHT_DECAY, BETAS = 8, 16.0, 1e-3, 0.0, (0.9, 0.999)
HF_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
SEED = 1234
METHODS = ("lora", "qlora", "full")

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def lmforge_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, labels=y).loss


def hf_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


@dataclass
class Contender:
    label: str
    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer | None = None

    def __post_init__(self) -> None:
        self.model.train()
        self.optimizer = make_adamw(self.model, LR, WEIGHT_DECAY, BETAS)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.loss_fn(self.model, x, y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return self.loss_fn(self.model, x, y).item()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def batch(index: int, vocab: int, size: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (size, seq + 1), generator=torch.Generator().manual_seed(SEED + index))
    return ids[:, :-1], ids[:, 1:]


# ---------------------------------------------------------------------------------------------
# The same weights on both sides.
# ---------------------------------------------------------------------------------------------
def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def hf_model(folder: Path, four_bit: bool = False) -> nn.Module:
    import transformers

    options: dict[str, Any] = {"attn_implementation": "sdpa", "dtype": torch.float32}
    if four_bit:
        options |= {"device_map": "cpu", "quantization_config": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **options)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def hf_peft(folder: Path, adapter: Path, four_bit: bool = False) -> nn.Module:
    import peft

    model = peft.PeftModel.from_pretrained(hf_model(folder, four_bit), adapter, is_trainable=True)
    config = model.peft_config["default"]
    targets = {name.rsplit(".", 1)[-1] for name in config.target_modules}  # e.g. self_attn.q_proj → q_proj
    got = (config.r, config.lora_alpha, targets, config.lora_dropout, config.use_rslora)
    assert got == (RANK, ALPHA, HF_TARGETS, 0.0, False), f"the adapter is not the LoRA to compare: {got}"
    return model


def build(cfg: ModelConfig, work: Path, methods: list[str]) -> tuple[dict[str, tuple[Contender, Contender]], str]:
    """{method: (lmforge, peer)} over one base model, and what the qlora row's peer is."""
    torch.manual_seed(SEED)
    base = CausalLM(cfg)
    save_hf(work / "base", base)
    lora = apply_method(copy.deepcopy(base), "lora", targets="all", r=RANK, alpha=ALPHA, dropout=0.0)
    with torch.no_grad():  # B away from zero: A gets a gradient from the first step, the adapter matters
        g = torch.Generator().manual_seed(SEED)
        for name, p in lora.named_parameters():
            if name.endswith(".B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    save_peft_adapter(work / "adapter", lora, base_model_name_or_path=str(work / "base"))
    qlora_peer = "hf+bnb+peft qlora" if bitsandbytes_available() else "hf+peft lora, float base"
    pairs: dict[str, tuple[Contender, Contender]] = {}
    for method in methods:
        if method == "lora":
            ours, theirs = lora, hf_peft(work / "base", work / "adapter")
            pairs[method] = (Contender("lmforge lora", ours, lmforge_loss), Contender("hf+peft lora", theirs, hf_loss))
        elif method == "qlora":
            ours = apply_method(copy.deepcopy(base), "qlora", targets="all", r=RANK, alpha=ALPHA, dropout=0.0)
            missing, unexpected = ours.load_state_dict(lora_state(lora), strict=False)
            assert not unexpected and not any(".lora." in k for k in missing), (missing, unexpected)
            theirs = hf_peft(work / "base", work / "adapter", four_bit=bitsandbytes_available())
            pairs[method] = (Contender("lmforge qlora", ours, lmforge_loss), Contender(qlora_peer, theirs, hf_loss))
        else:
            ours = apply_method(copy.deepcopy(base), "full")
            theirs = hf_model(work / "base")
            pairs[method] = (Contender("lmforge full", ours, lmforge_loss), Contender("hf full", theirs, hf_loss))
        ours_count, theirs_count = describe(ours).trainable, pairs[method][1].trainable()
        assert ours_count == theirs_count, f"{method}: lmforge trains {ours_count:,} parameters, peer {theirs_count:,}"
    return pairs, qlora_peer


def check_same(pairs: dict[str, tuple[Contender, Contender]], qlora_peer: str, check_steps: int,
               make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Loss on batch 0, then after check_steps optimizer steps on both sides, for every pair. Exact pairs must
    agree to fp32 rounding; a 4-bit pair to NF4's error; lmforge QLoRA vs a float base only loosely."""
    x, y = make_batch(0)
    diffs: dict[str, dict[str, float]] = {}
    for method, (ours, theirs) in pairs.items():
        first = (ours.loss(x, y), theirs.loss(x, y))
        for i in range(check_steps):
            ours.step(*make_batch(i)), theirs.step(*make_batch(i))
        after = (ours.loss(x, y), theirs.loss(x, y))
        diffs[method] = {"loss_lmforge": first[0], "loss_peer": first[1], "diff": abs(first[0] - first[1]),
                         "diff_after_steps": abs(after[0] - after[1]), "loss_drop": first[0] - after[0]}
        tolerance = 1e-4 if method != "qlora" else 2e-2 if "bnb" in qlora_peer else 5e-2
        assert diffs[method]["diff"] <= tolerance * max(1.0, first[0]), f"{method}: losses differ: {diffs[method]}"
        assert diffs[method]["diff_after_steps"] <= 10 * tolerance * max(1.0, first[0]), \
            f"{method}: after {check_steps} steps the losses differ: {diffs[method]}"
        assert check_steps == 0 or diffs[method]["loss_drop"] > 0, f"{method}: training did not lower the loss"
    return diffs


# ---------------------------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------------------------
def step_times(contender: Contender, warmup: int, steps: int, first_batch: int,
               make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
               clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of `steps` steps (batch ready, forward, backward, AdamW, loss read) after `warmup`."""
    times = []
    for i in range(warmup + steps):
        x, y = make_batch(first_batch + i)
        start = clock()
        contender.step(x, y)
        if i >= warmup:
            times.append(clock() - start)
    return times


def profile(contender: Contender, make_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], rows: int) -> None:
    contender.step(*make_batch(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(3):
            contender.step(*make_batch(i))
    print(f"\n=== torch.profiler: {contender.label}, 3 steps, sorted by self CPU time ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: lora, qlora, full")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender and round")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per contender and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all contenders")
    parser.add_argument("--check-steps", type=int, default=2, help="optimizer steps in the equivalence check")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = PyTorch's default")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (the measurement); cpu: the process's CPU time, which with "
                             "--threads 1 hardly moves when other processes load the machine")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler op tables (3 steps each)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for an idle CPU before each run")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 round of 1 + 2 steps")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods must name some of {', '.join(METHODS)}")
    if args.quick:
        args.no_wait = True
        args.warmup, args.steps, args.rounds, args.check_steps = 1, 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES["quick" if args.quick else "full"]
    cfg = ModelConfig.from_preset("small", **LLAMA, **shape["model"])
    size, seq = shape["batch"], shape["seq"]

    def make_batch(index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return batch(index, cfg.vocab_size, size, seq)

    with tempfile.TemporaryDirectory(prefix="lmforge-finetune-step-") as work:
        pairs, qlora_peer = build(cfg, Path(work), methods)
    if "qlora" in methods and "bnb" not in qlora_peer:
        print("note: bitsandbytes is not installed, so the qlora row's peer is HF + peft LoRA on the float base "
              "(pip install bitsandbytes for transformers' own 4-bit QLoRA on CPU)")
    diffs = check_same(pairs, qlora_peer, args.check_steps, make_batch)
    print(f"same weights, |loss difference| lmforge vs peer at step 0 and after {args.check_steps} steps: "
          + ", ".join(f"{m} {d['diff']:.1e} / {d['diff_after_steps']:.1e}" for m, d in diffs.items()))

    print(f"{cfg.n_layers} layers, d_model {cfg.d_model}, batch {size} x {seq}, threads {torch.get_num_threads()}, "
          f"LoRA r={RANK} alpha={ALPHA:g} on {', '.join(sorted(HF_TARGETS))}")
    times: dict[str, list[float]] = {c.label: [] for pair in pairs.values() for c in pair}
    next_batch = args.check_steps
    for r in range(args.rounds):
        for contender in (c for pair in pairs.values() for c in pair):
            settle(not args.no_wait, max_wait_s=60)
            times[contender.label] += step_times(contender, args.warmup, args.steps, next_batch, make_batch,
                                                 time.process_time if args.clock == "cpu" else time.perf_counter)
            print(f"round {r + 1}/{args.rounds}  {contender.label:<24}  median step "
                  f"{1e3 * statistics.median(times[contender.label][-args.steps:]):.1f} ms", flush=True)
        next_batch += args.warmup + args.steps

    if args.profile:
        for contender in (c for pair in pairs.values() for c in pair):
            settle(not args.no_wait, max_wait_s=60)
            profile(contender, make_batch, rows=25)

    results: dict[str, dict[str, Any]] = {}
    for method, (ours, theirs) in pairs.items():
        ours_ms, theirs_ms = (1e3 * statistics.median(times[c.label]) for c in (ours, theirs))
        results[method] = {"lmforge_median_ms": ours_ms, "peer": theirs.label, "peer_median_ms": theirs_ms,
                           "lmforge_mean_ms": 1e3 * statistics.fmean(times[ours.label]),
                           "peer_mean_ms": 1e3 * statistics.fmean(times[theirs.label]),
                           "trainable_parameters": ours.trainable(), "speed_ratio": theirs_ms / ours_ms}
    print(f"\n=== fine-tuning step (forward + backward + AdamW), {args.rounds} rounds x {args.steps} timed steps "
          f"(after {args.warmup} warm-up steps), batch {size} x {seq}, fp32, {args.clock} clock ===")
    rows = [[method, f"{r['trainable_parameters']:,}", r["lmforge_median_ms"], r["peer"], r["peer_median_ms"],
             f"{r['speed_ratio']:.3f}x"] for method, r in results.items()]
    print(format_table(["method", "trainable", "lmforge ms/step", "peer", "peer ms/step", "lmforge/peer"], rows))
    for method, r in results.items():
        print(f"ratio lmforge/peer {method} (speed, median step): {r['speed_ratio']:.3f}")

    path = write_results("finetune_step", {
        "config": {**shape["model"], **LLAMA, "batch": size, "seq": seq, "rank": RANK, "alpha": ALPHA, "lr": LR,
                   "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                   "check_steps": args.check_steps, "clock": args.clock, "threads": torch.get_num_threads(),
                   "quick": args.quick},
        "qlora_peer": qlora_peer if "qlora" in methods else None,
        "equivalence": diffs,
        "results": results,
    }, quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
