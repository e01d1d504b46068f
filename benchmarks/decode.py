"""Decode speed at batch 1 and load time: lmforge vs HF `transformers` on the same HF folder.

`--shape gpt2` (the 124M preset) or `--shape llama` (a ~110M Llama block: GQA, SwiGLU, RoPE) with
random weights, written once with `lmforge.save_hf`; lmforge (`lmforge.load`) and transformers
(`AutoModelForCausalLM.from_pretrained`) both load that folder, and both loads are timed. Greedy, KV
cache, a 16-token prompt and exactly 128 new tokens; the time of a call covers the prompt's
forward (prefill) and all 128 tokens. Each side gets one warm-up call, then the best of `--runs`
calls (interleaved) counts.

Before timing, both must produce the same first 32 greedy tokens, and those must vary (at least
`--min-distinct` different tokens): at GPT-2's init (std 0.02) a random model repeats one token
forever, which would make "identical" say nothing. The weights of every block and of an untied head
are therefore multiplied by `--weight-scale` (4) before the folder is written (same weights on both
sides; the cost of a token does not depend on the values).

With `--profile` (on by default when lmforge is less than 1.5x HF) the script times one lmforge
generate call piece by piece with forward hooks and wrapped helpers, and prints a torch.profiler
op table of the decode steps.

    python benchmarks/decode.py            # the measurement
    python benchmarks/decode.py --quick    # smoke run: a 2-layer, 128-wide model of the shape, 32 new tokens
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from _common import format_table, settle, write_results
from torch import nn

from lmforge.config import ModelConfig
from lmforge.generate import SamplingConfig, generate
from lmforge.interop import load, save_hf
from lmforge.models import CausalLM

# The module itself (the package re-exports the `generate` function under the same name).
lmgen = importlib.import_module("lmforge.generate")
stack = importlib.import_module("lmforge.nn.stack")  # position ids and masks of a causal stack


# ---------------------------------------------------------------------------------------------
# Both sides load the same Hugging Face folder (written by lmforge.save_hf), timed.
# ---------------------------------------------------------------------------------------------
SHAPES = {
    "gpt2": ("gpt2", {}),
    # Llama block at GPT-2-small scale: GQA (4 kv heads), SwiGLU, RoPE, untied 32k head; ~110M parameters.
    "llama": ("tinyllama-1.1b", dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_ff=2048)),
}
# --quick: the same block, 2 layers, 128 wide, a 4096-token vocabulary (a few seconds end to end).
QUICK = dict(n_layers=2, d_model=128, n_heads=4, vocab_size=4096)
# Block (and untied head) weights x 4: greedy output of a random model then varies (see the docstring).
WEIGHT_SCALE = 4.0


def scale_weights(model: CausalLM, factor: float) -> CausalLM:
    """Multiply every matrix except the (input) embeddings by `factor`, in place."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 and not name.startswith(("embed.", "decoder.positions.")):
                param.mul_(factor)
    return model


def through_hf_folder(model: CausalLM, folder: Path, runs: int) -> tuple[CausalLM, nn.Module, dict[str, float]]:
    """Write `model` as an HF folder, then load it with lmforge and with transformers (best of `runs`)."""
    from transformers import AutoModelForCausalLM

    save_hf(folder, model)
    loaders = {"lmforge": lambda: load(folder)[0],
               "hf": lambda: AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()}
    best: dict[str, float] = {}
    loaded: dict[str, Any] = {}
    for name, loader in loaders.items():
        for _ in range(runs):
            start = time.perf_counter()
            loaded[name] = loader()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    return loaded["lmforge"], loaded["hf"], best


# ---------------------------------------------------------------------------------------------
# The two generate calls.
# ---------------------------------------------------------------------------------------------
def lmforge_generate(model: CausalLM, prompt: list[int], new_tokens: int) -> list[int]:
    return generate(model, [prompt], SamplingConfig(max_new_tokens=new_tokens, greedy=True))[0]


def hf_generate(model: nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


def timed_calls(calls: dict[str, Callable[[], list[int]]], runs: int, expect: int,
                wait: bool) -> dict[str, list[float]]:
    """One warm-up call each, then `runs` rounds of one timed call each, interleaved."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            settle(wait, max_wait_s=60)
            start = time.perf_counter()
            tokens = fn()
            times[name].append(time.perf_counter() - start)
            assert len(tokens) == expect, f"{name} generated {len(tokens)} tokens, expected {expect}"
    return times


# ---------------------------------------------------------------------------------------------
# Where lmforge's per-token time goes.
# ---------------------------------------------------------------------------------------------
class Breakdown:
    """Accumulates seconds by label; labels seen during the prompt's forward get a "prefill " prefix."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.decoding = False

    def add(self, label: str, seconds: float) -> None:
        key = label if self.decoding else f"prefill {label}"
        self.seconds[key] += seconds
        self.calls[key] += 1

    def total(self, label: str) -> float:
        """Seconds of `label` in decode steps and in prefill together."""
        return self.seconds[label] + self.seconds[f"prefill {label}"]

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(label, time.perf_counter() - start)

        return timed

    def hook(self, module: nn.Module, label: str) -> list[Any]:
        starts: list[float] = []

        def pre(_module: nn.Module, _args: Any) -> None:
            starts.append(time.perf_counter())

        def post(_module: nn.Module, _args: Any, _out: Any) -> None:
            self.add(label, time.perf_counter() - starts.pop())

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


@contextmanager
def instrumented(model: CausalLM, breakdown: Breakdown) -> Iterator[None]:
    """Time model pieces with hooks and generate()'s helpers by wrapping them (nothing in src changes)."""
    def phase(_module: nn.Module, args: tuple[Any, ...]) -> None:
        breakdown.decoding = args[0].shape[1] == 1  # the prompt's forward is prefill; one token = decode

    handles = [model.register_forward_pre_hook(phase)]
    handles += breakdown.hook(model, "forward")
    handles += breakdown.hook(model.lm_head, "lm_head")
    handles += breakdown.hook(model.decoder.final_norm, "final norm")
    handles += breakdown.hook(model.embed, "embeddings")
    if model.decoder.positions.learned is not None:
        handles += breakdown.hook(model.decoder.positions.learned, "embeddings")
    for block in model.decoder.blocks:
        handles += breakdown.hook(block, "blocks")
        handles += breakdown.hook(block.attn_norm, "block norms")
        handles += breakdown.hook(block.mlp_norm, "block norms")
        handles += breakdown.hook(block.attn.qkv, "qkv + out")
        handles += breakdown.hook(block.attn.out, "qkv + out")
        handles += breakdown.hook(block.mlp, "mlp")
    saved = {
        (lmgen, "next_tokens"): lmgen.next_tokens,
        (lmgen, "_record"): lmgen._record,
        (stack, "position_ids_for"): stack.position_ids_for,
        (stack, "causal_mask_for"): stack.causal_mask_for,
    }
    lmgen.next_tokens = breakdown.wrap("next_tokens", lmgen.next_tokens)
    lmgen._record = breakdown.wrap("_record", lmgen._record)
    stack.position_ids_for = breakdown.wrap("positions + mask", stack.position_ids_for)
    stack.causal_mask_for = breakdown.wrap("positions + mask", stack.causal_mask_for)
    new_cache = model.new_cache

    def timed_cache(batch: int, max_len: int) -> Any:
        cache = new_cache(batch, max_len)
        cache.update = breakdown.wrap("kv cache", cache.update)
        return cache

    model.new_cache = timed_cache  # type: ignore[method-assign]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for (module, name), fn in saved.items():
            setattr(module, name, fn)
        del model.new_cache


def profile_lmforge(model: CausalLM, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """Per-token time of one lmforge generate call, split into exclusive pieces; then an op table."""
    b = Breakdown()
    with instrumented(model, b):
        start = time.perf_counter()
        lmforge_generate(model, prompt, new_tokens)
        total = time.perf_counter() - start
    s, cfg = b.seconds, model.cfg
    decode = total - s["prefill forward"]  # everything after the prompt's forward
    pieces = {
        f"lm_head matmul ({cfg.d_model} x {cfg.vocab_size})": s["lm_head"],
        "attention qkv + out matmuls": s["qkv + out"],
        "MLP (up, activation, down)": s["mlp"],
        f"norms ({2 * cfg.n_layers + 1})": s["block norms"] + s["final norm"],
        "KV cache writes (KVCache.update)": s["kv cache"],
        "rest of blocks (SDPA, reshapes, residuals)": s["blocks"] - s["qkv + out"] - s["mlp"] - s["block norms"]
        - s["kv cache"],
        "token + position embeddings": s["embeddings"],
        "position ids + mask building": s["positions + mask"],
        "rest of CausalLM.forward": s["forward"] - s["blocks"] - s["lm_head"] - s["final norm"] - s["embeddings"]
        - s["positions + mask"],
        "next_tokens (argmax)": b.total("next_tokens"),
        "_record (.tolist, appends, finished flags)": b.total("_record"),
        "rest of generate loop": decode - s["forward"] - b.total("next_tokens") - b.total("_record"),
    }
    per_token = {k: 1e3 * v / new_tokens for k, v in pieces.items()}
    step_ms = 1e3 * decode / new_tokens
    print(f"\n=== lmforge decode: where a token's time goes (one call, {new_tokens} tokens after a "
          f"{1e3 * s['prefill forward']:.1f} ms prefill; hooks add a few us per module call) ===")
    rows: list[list[Any]] = [[k, v, f"{100 * v / step_ms:.1f}%"] for k, v in per_token.items()]
    rows.append(["total per token", step_ms, "100.0%"])
    print(format_table(["piece", "ms/token", "share"], rows))
    forwards = b.calls["forward"]
    print(f"single-token forwards: {forwards} for {new_tokens} new tokens (the prompt's forward gives the first)"
          + (" (the last forward's logits are never used)" if forwards >= new_tokens else ""))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        lmforge_generate(model, prompt, new_tokens)
    print("\n=== torch.profiler: one lmforge generate call, sorted by self CPU time ===")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    return {"per_token_ms": per_token, "step_ms": step_ms, "prefill_ms": 1e3 * s["prefill forward"],
            "decode_forwards": forwards}


def weight_bytes(model: CausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpt2", help="gpt2 (124M) or llama (~110M)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--check-tokens", type=int, default=32, help="tokens that must match before timing")
    parser.add_argument("--min-distinct", type=int, default=5,
                        help="different tokens the checked greedy output must contain (else the check is void)")
    parser.add_argument("--weight-scale", type=float, default=WEIGHT_SCALE,
                        help="factor on block and head weights of the random model (1 = the preset's init)")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per side (best counts)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = PyTorch's default")
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                        help="per-token breakdown of lmforge (default: only when lmforge/HF < 1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for an idle CPU before each timing")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 layers x 128 wide, 32 new tokens, 1 timed run each, profile on")
    args = parser.parse_args()
    if args.quick:
        args.no_wait = True
        args.new_tokens, args.runs = 32, 1
        args.profile = args.profile is not False  # the profile's wrappers break when lmforge's internals move
    if args.threads:
        torch.set_num_threads(args.threads)
    args.check_tokens = min(args.check_tokens, args.new_tokens)

    torch.manual_seed(args.seed)
    preset, overrides = SHAPES[args.shape]
    if args.quick:
        for other_preset, other_overrides in SHAPES.values():  # the shapes not run must still build
            ModelConfig.from_preset(other_preset, **other_overrides)
        overrides = {**overrides, **QUICK, **({"n_kv_heads": 2} if "n_kv_heads" in overrides else {})}
    source = scale_weights(CausalLM(ModelConfig.from_preset(preset, **overrides)), args.weight_scale)
    with tempfile.TemporaryDirectory() as tmp:
        model, hf, load_s = through_hf_folder(source, Path(tmp), runs=1 if args.quick else 3)
    del source
    print("load time of the same HF folder (best): " + ", ".join(f"{k} {v:.2f} s" for k, v in load_s.items()))
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
    print(f"{args.shape}: {model.num_parameters() / 1e6:.1f}M parameters "
          f"({weight_bytes(model) / 2**20:.0f} MiB fp32), "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, batch 1, "
          f"{torch.get_num_threads()} threads")

    with torch.inference_mode():  # the weight copy, checked on every prompt position's logits
        ids = torch.tensor([prompt])
        logit_diff = (model(ids).logits - hf(input_ids=ids, use_cache=False).logits).abs().max().item()
    print(f"max |logit difference| lmforge vs hf over the prompt's {len(prompt)} positions: {logit_diff:.2e}")
    ours = lmforge_generate(model, prompt, args.check_tokens)
    theirs = hf_generate(hf, prompt, args.check_tokens)
    match = ours == theirs
    distinct = len(set(ours))
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    where = "" if match else f" (first difference at token {first_diff})"
    print(f"first {args.check_tokens} tokens match: {match}{where}; {distinct} distinct tokens in lmforge's")
    print(f"  lmforge: {ours[:16]} ...\n  hf:      {theirs[:16]} ...")
    if distinct < args.min_distinct:
        sys.exit(f"greedy output has {distinct} distinct tokens (< --min-distinct {args.min_distinct}): "
                 f"a degenerate model, the identity check would prove nothing; raise --weight-scale")
    if not match:
        sys.exit(f"lmforge and HF disagree at greedy token {first_diff}: not the same model, timing is void")

    times = timed_calls({"lmforge": lambda: lmforge_generate(model, prompt, args.new_tokens),
                         "hf": lambda: hf_generate(hf, prompt, args.new_tokens)},
                        args.runs, args.new_tokens, wait=not args.no_wait)
    results = {name: {"best_s": min(ts), "runs_s": ts, "tokens_per_s": args.new_tokens / min(ts)}
               for name, ts in times.items()}
    ratio = results["lmforge"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    payload: dict[str, Any] = {
        "load_seconds": load_s,
        "config": {"shape": args.shape, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                   "runs": args.runs, "quick": args.quick, "weight_mib": weight_bytes(model) / 2**20},
        "tokens_match": match, "check_tokens": args.check_tokens, "distinct_check_tokens": distinct,
        "weight_scale": args.weight_scale, "max_logit_diff": logit_diff,
        "results": results, "ratio_lmforge_over_hf": ratio,
    }
    if args.profile or (args.profile is None and ratio < 1.5):
        settle(not args.no_wait)
        payload["lmforge_profile"] = profile_lmforge(model, prompt, args.new_tokens)

    print(f"\n=== decode, batch 1, greedy, {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens, "
          f"best of {args.runs} ===")
    print(format_table(
        ["impl", "best s / call", "ms / token", "tokens/s", "all runs (s)"],
        [[name, r["best_s"], 1e3 * r["best_s"] / args.new_tokens, r["tokens_per_s"],
          " ".join(f"{t:.2f}" for t in r["runs_s"])] for name, r in results.items()],
    ))
    print(f"\nfirst {args.check_tokens} greedy tokens identical: {match} ({distinct} distinct)")
    print(f"ratio lmforge/hf (tokens/s): {ratio:.3f}")
    path = write_results(f"decode_{args.shape}" if args.shape != "gpt2" else "decode", payload, quick=args.quick)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
