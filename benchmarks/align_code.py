"""Code correctness as a reward, with no labels at all: PPO vs GRPO vs DPO on the `make demo` model.

- policy: the demo's causal LM pre-trained on this Python's standard library (`lmforge demo`: 1.1M parameters,
  BPE 2048); its checkpoint runs/demo/checkpoint is reused, or trained once with the demo recipe;
- prompts: function headers (the `def` line, plus the docstring where there is one) of top-level functions from
  stdlib files the demo never read (the tail of its shuffled file list, past its 6 MB of text); training and
  evaluation headers are disjoint;
- reward: 1 when `compile()` accepts header + the completion's function (the completion cut where a line starts
  at column 0: the function has ended there), else 0; the mean over a batch is the fraction that compiles;
- PPO and GRPO (`lmforge.align.ppo` / `grpo`, the one training loop) sample from the policy; DPO
  (`lmforge align dpo`) trains on pairs built from the base model's samples: four completions per training
  header, one that compiles preferred over one that does not, where there are both.

Reported per method: the compile rate of completions sampled (temperature 1, seeded) for the held-out headers,
the KL to the base (mean over those completions of the summed log-ratio, a Monte-Carlo KL(policy || base)),
the process CPU time of training (DPO: sampling the pairs included) and the compile-rate gain per CPU-minute.

    python benchmarks/align_code.py            # the recorded run (demo checkpoint cached in runs/demo)
    python benchmarks/align_code.py --model runs/demo/checkpoint   # any causal checkpoint as the policy
    python benchmarks/align_code.py --steps 16 --rollout_batch 16 --dpo_headers 96   # a smaller run
    python benchmarks/align_code.py --quick    # smoke run: a tiny random model, a few steps, results to a temp folder
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import format_table, write_results

from lmforge.align.grpo import GrpoSettings, grpo
from lmforge.align.logprobs import completion_logprobs, scoring_mode
from lmforge.align.ppo import PpoSettings, ppo
from lmforge.align.rollout import compiles, sample_rollout
from lmforge.config import ModelConfig
from lmforge.data.corpus import STDLIB, resolve_files
from lmforge.generate import SamplingConfig
from lmforge.interop import load
from lmforge.models import CausalLM, build_model
from lmforge.recipes.align_dpo import DpoConfig, run_dpo
from lmforge.recipes.align_reward import PreferenceDataConfig
from lmforge.recipes.demo import DemoConfig
from lmforge.recipes.pretrain import DataConfig, pretrain
from lmforge.tokenizer import DEFAULT_SPECIALS, Tokenizer, train_char
from lmforge.train import TrainConfig, save_checkpoint

DEMO_RUN = Path("runs/demo")
RUN_DIR = Path("runs/align-code")


@dataclass
class Scale:
    """Everything that differs between the recorded run and --quick."""

    held_out_files: int = 300  # the shuffled stdlib's last files: far past the demo's 6 MB
    train_headers: int = 256
    eval_headers: int = 96
    header_tokens: int = 64
    max_new_tokens: int = 48
    steps: int = 48  # PPO/GRPO optimizer steps (minibatches)
    rollout_batch: int = 32
    minibatches: int = 2
    ppo_epochs: int = 2
    group_size: int = 4
    beta: float = 0.05
    lr: float = 3e-4
    dpo_headers: int = 256  # training headers sampled dpo_samples times each for DPO's pairs
    dpo_samples: int = 4
    dpo_steps: int = 48
    dpo_batch: int = 8
    dpo_lr: float = 5e-5  # DPO's usual rate: at 3e-4 a 17-pair run over-fits (held-out loss 0.69 -> 3.9)
    dpo_beta: float = 0.1
    model: dict[str, Any] = field(default_factory=dict)  # --quick: a tiny random model instead of the demo's


QUICK = Scale(held_out_files=40, train_headers=16, eval_headers=8, header_tokens=48, max_new_tokens=8, steps=4,
              dpo_headers=16,
              rollout_batch=8, minibatches=2, ppo_epochs=1, group_size=2, dpo_steps=2, dpo_batch=2,
              model=dict(preset="tiny", context_length=128))


# -- prompts and reward ---------------------------------------------------------------------------------------------


def function_headers(files: list[Path]) -> Iterator[str]:
    """The header (and docstring, if any) of every top-level function with more body after it, in file order."""
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            documented = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
            first = body[1] if documented and len(body) > 1 else body[0]
            if first is body[0] and documented:
                continue  # a docstring and nothing else: no body to write
            header = "".join(lines[node.lineno - 1:first.lineno - 1])
            if header.endswith("\n"):
                yield header


def function_body(completion: str) -> str:
    """The completion up to the first line that starts at column 0 (the function ends there)."""
    kept = []
    for line in completion.split("\n"):
        if kept and line and not line[0].isspace():
            break
        kept.append(line)
    return "\n".join(kept)


def function_compiles(prompts: list[str], completions: list[str]) -> list[float]:
    """The benchmark's reward: 1.0 where header + the completion's function compiles."""
    return compiles(prompts, [function_body(c) for c in completions])


def headers_for(scale: Scale, tokenizer: Tokenizer) -> tuple[list[str], list[str]]:
    files = resolve_files([STDLIB], DataConfig().shuffle_seed)[-scale.held_out_files:]
    fitting = [h for h in function_headers(files) if len(tokenizer.encode(h)) <= scale.header_tokens]
    order = torch.randperm(len(fitting), generator=torch.Generator().manual_seed(0)).tolist()
    chosen = [fitting[i] for i in order]
    need = scale.train_headers + scale.eval_headers
    if len(chosen) < need:
        raise SystemExit(f"only {len(chosen)} headers of <= {scale.header_tokens} tokens in the held-out files; "
                         f"need {need}")
    return chosen[:scale.train_headers], chosen[scale.train_headers:need]


# -- models -------------------------------------------------------------------------------------------------------


def base_checkpoint(scale: Scale, run_dir: Path) -> Path:
    """The demo model's checkpoint (trained once with the demo recipe when absent); --quick: a tiny random model."""
    if scale.model:
        texts = [p.read_text(encoding="utf-8", errors="replace")
                 for p in resolve_files([STDLIB], DataConfig().shuffle_seed)[-scale.held_out_files:]]
        tokenizer = train_char(texts, DEFAULT_SPECIALS)
        torch.manual_seed(0)
        overrides = dict(scale.model)
        model = build_model(ModelConfig.from_preset(overrides.pop("preset"), vocab_size=tokenizer.vocab_size,
                                                    **overrides))
        folder = run_dir / "base"
        save_checkpoint(folder, model, tokenizer)
        return folder
    checkpoint = DEMO_RUN / "checkpoint"
    if not (checkpoint / "model.safetensors").is_file():
        print(f"no demo model in {checkpoint}: training one with the demo recipe (a few minutes)")
        pretrain(DemoConfig(out_dir=str(DEMO_RUN)))
    return checkpoint


def load_causal(path: Path) -> tuple[CausalLM, Tokenizer]:
    model, tokenizer = load(path)
    return model, tokenizer


@torch.no_grad()
def evaluate(policy: CausalLM, reference: CausalLM, tokenizer: Tokenizer, headers: list[str],
             scale: Scale) -> dict[str, Any]:
    """Compile rate and KL(policy || base) over seeded samples for the held-out headers."""
    sampling = SamplingConfig(max_new_tokens=scale.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    rollout = sample_rollout(policy, tokenizer, headers, sampling)
    rewards = function_compiles(rollout.prompts, rollout.completions)
    args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
    with scoring_mode(policy, reference):
        kl = (completion_logprobs(policy, *args) - completion_logprobs(reference, *args)).sum(1)
    samples = [{"header": h, "completion": function_body(c), "compiles": bool(r)}
               for h, c, r in zip(rollout.prompts, rollout.completions, rewards, strict=True)]
    return {"compile_rate": sum(rewards) / len(rewards), "kl": float(kl.mean()),
            "length": float(rollout.lengths.float().mean()), "samples": samples}


def train_cfg(steps: int, lr: float, batch_size: int = 1) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=0, schedule="constant",
                       weight_decay=0.0, progress=False, log_every=4, eval_every=0, save_every_minutes=0)


# -- the three methods -----------------------------------------------------------------------------------------------


def run_ppo(base: Path, train_headers: list[str], scale: Scale, out: Path) -> CausalLM:
    policy, tokenizer = load_causal(base)
    settings = PpoSettings(rollout_batch=scale.rollout_batch, minibatches=scale.minibatches,
                           ppo_epochs=scale.ppo_epochs, max_new_tokens=scale.max_new_tokens, beta=scale.beta)
    return ppo(policy, tokenizer, train_headers, function_compiles, settings, train_cfg(scale.steps, scale.lr),
               out_dir=out).policy


def run_grpo(base: Path, train_headers: list[str], scale: Scale, out: Path) -> CausalLM:
    policy, tokenizer = load_causal(base)
    settings = GrpoSettings(rollout_batch=scale.rollout_batch, minibatches=scale.minibatches,
                            ppo_epochs=scale.ppo_epochs, max_new_tokens=scale.max_new_tokens, beta=scale.beta,
                            group_size=scale.group_size)
    return grpo(policy, tokenizer, train_headers, function_compiles, settings, train_cfg(scale.steps, scale.lr),
                out_dir=out).policy


def preference_pairs(base: Path, headers: list[str], scale: Scale) -> list[dict[str, str]]:
    """dpo_samples samples of the base model per header; where some compile and some do not, the first that
    compiles is chosen over the first that does not (one pair per header)."""
    model, tokenizer = load_causal(base)
    k = scale.dpo_samples
    sampling = SamplingConfig(max_new_tokens=scale.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=99)
    rollout = sample_rollout(model, tokenizer, [h for h in headers for _ in range(k)], sampling)
    bodies = [function_body(c) for c in rollout.completions]
    rewards = function_compiles(rollout.prompts, rollout.completions)
    pairs = []
    for start in range(0, len(bodies), k):
        group = [i for i in range(start, start + k) if bodies[i].strip()]
        good = next((i for i in group if rewards[i] == 1.0), None)
        bad = next((i for i in group if rewards[i] == 0.0), None)
        if good is not None and bad is not None:
            pairs.append({"prompt": rollout.prompts[start], "chosen": bodies[good], "rejected": bodies[bad]})
    return pairs


def run_dpo_method(base: Path, train_headers: list[str], scale: Scale, out: Path) -> tuple[CausalLM, int]:
    pairs = preference_pairs(base, train_headers[:scale.dpo_headers], scale)
    if scale.model and len(pairs) < 4:  # --quick: a random model never compiles; `pass` stands in, to run the code path
        pairs = [{"prompt": h, "chosen": "    pass\n", "rejected": "    pas\n"} for h in train_headers]
    if len(pairs) < 4:
        raise SystemExit(f"only {len(pairs)} preference pairs from {scale.dpo_headers} headers; raise --dpo_headers")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = DpoConfig(model=str(base), prefs=PreferenceDataConfig(data=str(data), format="pairs", eval_fraction=0.1,
                                                                  chat_template=False),
                    beta=scale.dpo_beta, out_dir=str(out / "run"), overwrite=True,
                    train=train_cfg(scale.dpo_steps, scale.dpo_lr, scale.dpo_batch))
    return run_dpo(cfg).model, len(pairs)


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    """fn's result and the process CPU seconds it took (all threads)."""
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


# -- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps: checks the script runs")
    parser.add_argument("--model", type=Path, default=None,
                        help=f"policy checkpoint (default: the demo's, {DEMO_RUN}/checkpoint, trained when absent)")
    tunable = ("steps", "rollout_batch", "dpo_headers", "dpo_samples", "dpo_steps", "eval_headers", "max_new_tokens")
    for name in tunable:
        parser.add_argument(f"--{name}", type=int, default=None, help=f"override the scale's {name}")
    args = parser.parse_args()
    scale = QUICK if args.quick else Scale()
    overrides = {k: getattr(args, k) for k in tunable if getattr(args, k) is not None}
    scale = dataclasses.replace(scale, **overrides)
    run_dir = Path(tempfile.mkdtemp(prefix="align-code-")) if args.quick else RUN_DIR
    base = args.model or base_checkpoint(scale, run_dir)
    reference, tokenizer = load_causal(base)
    train_headers, eval_headers = headers_for(scale, tokenizer)
    print(f"{len(train_headers)} training headers, {len(eval_headers)} held-out headers; base model {base}")
    rows: dict[str, dict[str, Any]] = {"base": {**evaluate(reference, reference, tokenizer, eval_headers, scale),
                                                "cpu_s": 0.0}}
    print(f"base: compile rate {rows['base']['compile_rate']:.3f}")
    for name, method in (("ppo", run_ppo), ("grpo", run_grpo)):
        policy, seconds = timed(method, base, train_headers, scale, run_dir / name)
        rows[name] = {**evaluate(policy, reference, tokenizer, eval_headers, scale), "cpu_s": seconds}
        print(f"{name}: compile rate {rows[name]['compile_rate']:.3f}, KL {rows[name]['kl']:.3f}, {seconds:.0f} CPU s")
    (policy, pairs), seconds = timed(run_dpo_method, base, train_headers, scale, run_dir / "dpo")
    rows["dpo"] = {**evaluate(policy, reference, tokenizer, eval_headers, scale), "cpu_s": seconds, "pairs": pairs}
    print(f"dpo: compile rate {rows['dpo']['compile_rate']:.3f}, KL {rows['dpo']['kl']:.3f}, {seconds:.0f} CPU s, "
          f"{pairs} pairs")
    report(args.quick, scale, rows, str(base))


def report(quick: bool, scale: Scale, rows: dict[str, dict[str, Any]], base: str) -> None:
    start = rows["base"]["compile_rate"]
    table_rows = []
    for name, row in rows.items():
        minutes = row["cpu_s"] / 60
        gain = (row["compile_rate"] - start) / minutes if minutes > 0 else None
        row["gain_per_cpu_minute"] = gain
        table_rows.append([name, f"{row['compile_rate']:.3f}", f"{row['kl']:.3f}", f"{row['length']:.1f}",
                           f"{minutes:.2f}", "-" if gain is None else f"{gain:+.3f}"])
    headers = ["method", "compile rate", "KL to base", "tokens", "CPU min", "gain / CPU min"]
    table = format_table(headers, table_rows)
    print(table)
    payload = {"scale": scale.__dict__, "base_model": base,
               "results": {k: {m: v for m, v in r.items() if m != "samples"} for k, r in rows.items()},
               "samples": {k: r["samples"][:4] for k, r in rows.items()}}
    path = write_results("align_code", payload, quick)
    samples = []
    for name, row in rows.items():
        for sample in row["samples"][:2]:
            mark = "compiles" if sample["compiles"] else "does not compile"
            samples += [f"**{name}** ({mark}):", "", "```python", sample["header"] + sample["completion"], "```", ""]
    lines = ["# Code correctness as a reward: PPO vs GRPO vs DPO", "",
             f"Policy {base}; {scale.train_headers} training headers, {scale.eval_headers} held-out; "
             f"{scale.max_new_tokens} new tokens; beta {scale.beta}.", "", table, "", "## Samples", "", *samples]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
