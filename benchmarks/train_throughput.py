"""Training tokens/s on nanoGPT's CPU Shakespeare configuration: lmforge vs plain PyTorch vs HF GPT-2.

Shape (all three): 4 layers, 4 heads, d_model 128, context 64, batch 12, char vocab 65, dropout 0.
Optimiser (all three): AdamW lr 1e-3 (linear warmup, cosine), betas (0.9, 0.99), weight decay 0.1
on >=2-D tensors only, global grad-norm clip 1.0, fp32.

  (a) lmforge    `lmforge.train.train` on `CausalLM(ModelConfig.from_preset("tiny-char"))`
                 with `RandomWindows` batches: the library path exactly as a user runs it.
  (b) reference  nanoGPT's model.py GPT and train.py loop, written out below in plain PyTorch:
                 one c_attn Linear, SDPA is_causal, LayerNorms and Linears with biases (bias=True),
                 exact GELU (nn.GELU()), learned positions, tied head, dropout modules at p=0,
                 nanoGPT's init, get_lr, torch.randint get_batch and AdamW with decay/no-decay
                 groups; nanoGPT passes fused=True only on CUDA, so on CPU this is PyTorch's
                 default (single-tensor, for-loop) AdamW, exactly as nanoGPT runs on a CPU.
                 Before timing, lmforge's tiny-char weights are copied into it and the logits compared.
  (c) hf         transformers' GPT2LMHeadModel (sdpa attention) in the same plain loop, with
                 activation_function="gelu" (exact GELU, GPT-2's default is the tanh "gelu_new") so
                 that its math matches (a) and (b); Conv1D layers, biases, tied head as GPT-2.
  and, to tell the optimiser from the rest, "reference+fused": (b) with AdamW(fused=True), which
  lmforge uses on CPU and nanoGPT only on CUDA.

Each contender trains a fresh model for `warmup + steps` steps per round; rounds are interleaved
(a, b, c, a, b, c, ...) so that load from other processes hits all three alike. A step's time
runs from fetching its batch to fetching the next one (batch + forward + backward + clip + AdamW).

    python benchmarks/train_throughput.py            # the measurement
    python benchmarks/train_throughput.py --quick    # smoke run, a few seconds
    python benchmarks/train_throughput.py --profile  # + torch.profiler op tables per contender
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from _common import DEFAULT_DATA, format_table, load_char_data, settle, write_results
from torch import nn

from lmforge.checkpoint import model_tensors
from lmforge.config import ModelConfig
from lmforge.data.batches import RandomWindows
from lmforge.estimate import flops_per_token, measured_matmul_peak
from lmforge.interop import to_hf_state_dict
from lmforge.models import CausalLM
from lmforge.train import TrainConfig, train

# nanoGPT: config/train_shakespeare_char.py with the README's CPU overrides.
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH, VOCAB = 4, 4, 128, 64, 12, 65
LR, MIN_LR, WARMUP_ITERS, LR_DECAY_ITERS = 1e-3, 1e-4, 100, 2000
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.99), 0.1, 1.0
SEED = 1337

OnStep = Callable[[], None]
Runner = Callable[[int, OnStep], None]  # (number of steps, called at the start of every step)


# ---------------------------------------------------------------------------------------------
# (a) lmforge, through its own training loop.
# ---------------------------------------------------------------------------------------------
def lmforge_runner(tokens: np.ndarray) -> Runner:
    def run(n_steps: int, on_step: OnStep) -> None:
        torch.manual_seed(SEED)
        model = CausalLM(ModelConfig.from_preset("tiny-char"))
        windows = RandomWindows(tokens, BATCH, BLOCK, seed=SEED)

        def batches(index: int) -> dict[str, torch.Tensor]:
            on_step()  # train() asks for batch i at the start of step i
            return windows(index)

        cfg = TrainConfig(
            steps=n_steps, batch_size=BATCH, lr=LR, min_lr_ratio=MIN_LR / LR, warmup_steps=WARMUP_ITERS,
            beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
            eval_every=0, device="cpu", precision="fp32", progress=False, seed=SEED,
        )
        train(model, batches, cfg)

    return run


# ---------------------------------------------------------------------------------------------
# (b) A nanoGPT-style model, written out in plain PyTorch.
# ---------------------------------------------------------------------------------------------
# As nanoGPT's model.py with bias=True and dropout=0.0 (its nn.Dropout modules kept, at p=0).
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=True)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=True)
        self.resid_dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, channels = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, channels // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(batch, seq, channels)))


class MLP(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=True)
        self.gelu = nn.GELU()  # exact (erf) GELU, as nanoGPT
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=True)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=True)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=True)
        self.mlp = MLP(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=True)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# ---------------------------------------------------------------------------------------------
# (c) HF transformers GPT-2 of the same shape.
# ---------------------------------------------------------------------------------------------
def hf_gpt2(activation: str) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=activation,
        bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def hf_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# Same model: lmforge's tiny-char weights copied into (b) and (c) give the same logits.
# ---------------------------------------------------------------------------------------------
def nanogpt_state_from_lmforge(model: CausalLM) -> dict[str, torch.Tensor]:
    """lmforge parameter names -> nanoGPT's (both keep nn.Linear (out, in) weights)."""
    names = {"embed": "wte", "decoder.positions.learned": "wpe", "decoder.final_norm": "ln_f", "lm_head": "lm_head"}
    parts = {"attn_norm": "ln_1", "attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj", "mlp_norm": "ln_2",
             "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
    state = {}
    for name, tensor in model.state_dict().items():
        module, _, param = name.rpartition(".")
        if module.startswith("decoder.blocks."):
            _, _, index, rest = module.split(".", 3)
            state[f"h.{index}.{parts[rest]}.{param}"] = tensor
        else:
            state[f"{names[module]}.{param}"] = tensor
    return state


def check_same_model(tokens: np.ndarray, hf_activation: str | None) -> dict[str, float]:
    """Max |logit difference| of (b) and (c) against lmforge's tiny-char model on the same weights."""
    torch.manual_seed(SEED)
    ours = CausalLM(ModelConfig.from_preset("tiny-char")).eval()
    reference = GPT(VOCAB, BLOCK, N_LAYER, N_HEAD, N_EMBD).eval()
    state = nanogpt_state_from_lmforge(ours)
    reference.load_state_dict(state, strict=True)
    n_ours, n_ref = ours.num_parameters(), sum(p.numel() for p in reference.parameters())
    assert n_ours == n_ref, f"parameters: lmforge {n_ours:,} vs reference {n_ref:,}"
    x = torch.stack([torch.from_numpy(tokens[i : i + BLOCK]) for i in range(0, 4 * BLOCK, BLOCK)])
    diffs = {}
    with torch.no_grad():
        logits = ours(x).logits
        diffs["reference"] = (reference(x) - logits).abs().max().item()
        if hf_activation is not None:
            hf = hf_gpt2(hf_activation).eval()
            missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.cfg, model_tensors(ours)), strict=False)
            assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied head
            hf.tie_weights()
            diffs["hf"] = (hf_logits(hf, x) - logits).abs().max().item()
    return diffs


# ---------------------------------------------------------------------------------------------
# The plain training loop (b) and (c) share, in nanoGPT's train.py style.
# ---------------------------------------------------------------------------------------------
def get_lr(it: int) -> float:
    if it < WARMUP_ITERS:
        return LR * (it + 1) / (WARMUP_ITERS + 1)
    if it > LR_DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / (LR_DECAY_ITERS - WARMUP_ITERS)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def configure_optimizer(model: nn.Module, fused: bool = False) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # nanoGPT passes fused=True only on CUDA; on CPU PyTorch's default is then the single-tensor
    # AdamW (a Python loop of ~10 small ops per parameter tensor). lmforge fuses on CPU too.
    return torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=fused or None)


def plain_runner(tokens: np.ndarray, make_model: Callable[[], nn.Module],
                 logits_of: Callable[[nn.Module, torch.Tensor], torch.Tensor], fused_adamw: bool = False) -> Runner:
    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(tokens) - BLOCK, (BATCH,))
        x = torch.stack([torch.from_numpy(tokens[i : i + BLOCK]) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + BLOCK]) for i in ix.tolist()])
        return x, y

    def run(n_steps: int, on_step: OnStep) -> None:
        torch.manual_seed(SEED)
        model = make_model().train()
        optimizer = configure_optimizer(model, fused=fused_adamw)
        for it in range(n_steps):
            on_step()
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it)
            x, y = get_batch()
            logits = logits_of(model, x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()

    return run


# ---------------------------------------------------------------------------------------------
# Measurement.
# ---------------------------------------------------------------------------------------------
def step_times(run: Runner, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` steps that follow `warmup` untimed ones."""
    stamps: list[float] = []
    run(warmup + steps, lambda: stamps.append(time.perf_counter()))
    stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps[warmup:-1], stamps[warmup + 1 :], strict=True)]


def profile(name: str, run: Runner, warmup: int, active: int, rows: int) -> None:
    """torch.profiler over `active` steps after `warmup` unprofiled ones; prints the op table."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    count = 0

    def on_step() -> None:
        nonlocal count
        count += 1
        if count == warmup + 1:
            prof.start()
        elif count == warmup + active + 1:
            prof.stop()

    run(warmup + active + 1, on_step)
    print(f"\n=== torch.profiler: {name}, {active} steps, sorted by self CPU time ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="tiny Shakespeare input.txt")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per round")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all implementations")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = PyTorch's default")
    parser.add_argument("--hf-activation", default="gelu",
                        help="GPT-2 activation_function for HF: gelu (exact, as nanoGPT and tiny-char; the default), "
                             "gelu_new (GPT-2's own tanh GELU) or gelu_pytorch_tanh")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-fused-reference", action="store_true",
                        help="skip the extra row: the reference loop with torch.optim.AdamW(fused=True)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler op tables (20 steps each)")
    parser.add_argument("--no-wait", action="store_true", help="do not wait for an idle CPU before each run")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 2 + 5 steps, a short peak")
    args = parser.parse_args()
    if args.quick:
        args.no_wait = True
        args.warmup, args.steps, args.rounds = 2, 5, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    _, tokens = load_char_data(args.data)
    cfg = ModelConfig.from_preset("tiny-char")
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.context_length, cfg.vocab_size) == (
        N_LAYER, N_HEAD, N_EMBD, BLOCK, VOCAB), "the tiny-char preset no longer matches nanoGPT's CPU shape"
    assert (cfg.mlp, cfg.norm, cfg.positions, cfg.hidden_size, cfg.tie_embeddings, cfg.attention_bias,
            cfg.mlp_bias, cfg.norm_bias, cfg.dropout) == ("gelu", "layernorm", "learned", 4 * N_EMBD, True, True,
                                                          True, True, 0.0), "tiny-char is no longer nanoGPT's model"
    diffs = check_same_model(tokens, None if args.no_hf else args.hf_activation)
    print("same weights, max |logit difference| vs lmforge: "
          + ", ".join(f"{name} {d:.1e}" for name, d in diffs.items()))
    assert diffs["reference"] < 1e-4, f"the reference is not lmforge's model: {diffs}"
    assert args.hf_activation != "gelu" or diffs.get("hf", 0.0) < 1e-4, f"HF GPT-2 is not lmforge's model: {diffs}"

    def reference_gpt() -> nn.Module:
        return GPT(VOCAB, BLOCK, N_LAYER, N_HEAD, N_EMBD)

    contenders: dict[str, Runner] = {
        "lmforge": lmforge_runner(tokens),
        "reference": plain_runner(tokens, reference_gpt, lambda m, x: m(x)),
    }
    if not args.no_fused_reference:  # the reference again, with lmforge's choice of a fused AdamW
        contenders["reference+fused"] = plain_runner(tokens, reference_gpt, lambda m, x: m(x), fused_adamw=True)
    if not args.no_hf:
        contenders["hf"] = plain_runner(tokens, lambda: hf_gpt2(args.hf_activation), hf_logits)

    settle(not args.no_wait, max_wait_s=60)
    peak = measured_matmul_peak(size=1024, trials=1, seconds=0.05) if args.quick else measured_matmul_peak()
    fpt = flops_per_token(cfg, BLOCK)
    print(f"threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
          f"{fpt / 1e6:.2f} MFLOP per trained token, {BATCH * BLOCK} tokens per step")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(args.rounds):
        for name, run in contenders.items():
            settle(not args.no_wait, max_wait_s=60)
            times[name] += step_times(run, args.warmup, args.steps)
            print(f"round {r + 1}/{args.rounds}  {name:<9}  median step "
                  f"{1e3 * statistics.median(times[name][-args.steps:]):.2f} ms", flush=True)

    if args.profile:
        for name, run in contenders.items():
            settle(not args.no_wait, max_wait_s=60)
            profile(name, run, warmup=5, active=20, rows=25)

    tokens_per_step = BATCH * BLOCK
    results: dict[str, dict[str, float]] = {}
    for name, ts in times.items():
        median_tps = tokens_per_step / statistics.median(ts)
        results[name] = {
            "median_step_ms": 1e3 * statistics.median(ts),
            "mean_step_ms": 1e3 * statistics.fmean(ts),
            "tokens_per_s_median": median_tps,
            "tokens_per_s_total": tokens_per_step * len(ts) / sum(ts),
            "mfu": fpt * median_tps / peak,
        }
    rows = [[name, r["median_step_ms"], r["mean_step_ms"], round(r["tokens_per_s_median"]),
             round(r["tokens_per_s_total"]), f"{100 * r['mfu']:.2f}%"] for name, r in results.items()]
    print(f"\n=== training throughput, {args.rounds} rounds x {args.steps} timed steps (after {args.warmup} "
          f"warm-up steps) per implementation, batch {BATCH} x {BLOCK} tokens, fp32 ===")
    print(format_table(["impl", "median ms/step", "mean ms/step", "tok/s (median)", "tok/s (total)", "MFU"], rows))
    ratios = {"lmforge/reference": results["lmforge"]["tokens_per_s_median"]
              / results["reference"]["tokens_per_s_median"]}
    if "hf" in results:
        ratios["lmforge/hf"] = results["lmforge"]["tokens_per_s_median"] / results["hf"]["tokens_per_s_median"]
    print(f"\nfp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (MFU = {fpt / 1e6:.2f} MFLOP/token x tok/s / peak)")
    for key, value in ratios.items():
        print(f"ratio {key} (tokens/s, median step): {value:.3f}")

    path = write_results("train_throughput", {
        "config": {"n_layer": N_LAYER, "n_head": N_HEAD, "n_embd": N_EMBD, "block": BLOCK, "batch": BATCH,
                   "vocab": VOCAB, "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                   "hf_activation": args.hf_activation, "quick": args.quick},
        "max_logit_diff_vs_lmforge": diffs,
        "matmul_peak_gflops": peak / 1e9,
        "flops_per_token": fpt,
        "results": results,
        "ratios": ratios,
    }, quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
