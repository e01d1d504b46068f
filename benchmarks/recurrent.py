"""RNN vs LSTM vs GRU vs transformer on tiny Shakespeare, char-level, at equal parameter count and equal wall time.

The transformer is nanoGPT's CPU shape (preset tiny-char: 4 layers, 4 heads, 128 wide, block 64, tied head,
~0.8M parameters). Each recurrent model (lmforge.models.RecurrentLM: `--model.arch rnn|lstm|gru`, tied head) gets
`--rnn_layers` stacked layers with the hidden size that brings it closest to the transformer's parameter count.

Every model trains for the same `--seconds` of wall time on the same data: random windows of 64 tokens from the
first 90% of the text (nanoGPT's split), batch 12, AdamW (lr 1e-3 after 100 warm-up steps, cosine to 1e-4 over the
time budget, beta2 0.99, weight decay 0.1 on matrices), gradient clipping at 1.0; each window starts from an
empty state / empty context, so all four see the same 64 characters of history at most. Reported: validation loss
on a fixed set of windows from the last 10%, training tokens/s, loss by position in the window (mean loss at
positions 0-7, 8-15, ...: where the transformer's advantage, if any, lies), and a sample from each.

    python benchmarks/recurrent.py --seconds 300      # the measurement (alone on the machine: equal wall time)
    python benchmarks/recurrent.py --quick            # seconds: tiny models, 3 s each
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch
from _common import DEFAULT_DATA, format_table, load_char_data, results_dir, settle, split_90_10, write_results

from lmforge.config import ModelConfig
from lmforge.generate import SamplingConfig, generate
from lmforge.models import Model, build_model
from lmforge.models.recurrent import recurrent_parameters

CONTEXT, BATCH, BUCKET = 64, 12, 8
ARCHS = ("transformer", "rnn", "lstm", "gru")


def matched_config(arch: str, vocab: int, layers: int, quick: bool) -> ModelConfig:
    """tiny-char for the transformer; for a recurrent arch the hidden size whose parameter count is closest."""
    base = dict(vocab_size=vocab, context_length=CONTEXT)
    if quick:
        base.update(d_model=32, n_layers=1, n_heads=2)
    transformer = ModelConfig.from_preset("tiny-char", **base)
    if arch == "transformer":
        return transformer
    target = build_model(transformer).num_parameters()
    best = min(range(8, 2048), key=lambda d: abs(recurrent_parameters(
        ModelConfig.from_preset("tiny-char", **{**base, "arch": arch, "d_model": d, "n_layers": layers,
                                                "n_heads": 1})) - target))
    return ModelConfig.from_preset("tiny-char", **{**base, "arch": arch, "d_model": best, "n_layers": layers,
                                                   "n_heads": 1})


def windows(tokens: np.ndarray, generator: np.random.Generator, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = generator.integers(0, len(tokens) - CONTEXT - 1, count)
    block = np.stack([tokens[s:s + CONTEXT + 1] for s in starts])
    return torch.from_numpy(block[:, :-1]), torch.from_numpy(block[:, 1:])


def optimizer_for(model: Model, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.99))


def train_for(model: Model, tokens: np.ndarray, seconds: float, lr: float = 1e-3, min_lr: float = 1e-4,
              warmup: int = 100) -> dict[str, float]:
    """Train until `seconds` of wall time have passed; the learning rate follows the elapsed-time fraction."""
    generator, optimizer = np.random.default_rng(0), optimizer_for(model, lr)
    model.train()
    step, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fraction = elapsed / seconds
        rate = lr * min(1.0, (step + 1) / warmup)
        rate = min(rate, min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in optimizer.param_groups:
            group["lr"] = rate
        inputs, labels = windows(tokens, generator, BATCH)
        loss = model(inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
    seconds_used = time.perf_counter() - start
    return dict(steps=step, seconds=seconds_used, tokens_per_s=step * BATCH * CONTEXT / seconds_used,
                last_train_loss=loss.item())


@torch.no_grad()
def evaluate(model: Model, val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, list[float]]:
    """Mean validation loss and the loss at each position bucket of the window."""
    model.eval()
    inputs, labels = val
    per_token = []
    for i in range(0, len(inputs), 50):
        logits = model(inputs[i:i + 50]).logits
        per_token.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[i:i + 50],
                                                           reduction="none"))
    losses = torch.cat(per_token)
    buckets = losses.view(len(losses), CONTEXT // BUCKET, BUCKET).mean(dim=(0, 2))
    return float(losses.mean()), buckets.tolist()


def sample(model: Model, tokenizer: Any, prompt: str = "ROMEO:\n") -> str:
    cfg = SamplingConfig(max_new_tokens=CONTEXT - len(prompt), temperature=0.8, seed=0)
    new = generate(model, [tokenizer.encode(prompt)], cfg)[0]
    return prompt + tokenizer.decode(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 s each (a smoke run)")
    parser.add_argument("--seconds", type=float, default=300.0, help="training wall time per model")
    parser.add_argument("--rnn_layers", type=int, default=2, help="stacked layers of each recurrent model")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the same for every model)")
    parser.add_argument("--val_windows", type=int, default=500, help="validation windows of 64 tokens")
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--no-settle", action="store_true", help="skip waiting for an idle CPU before each run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, tokens = load_char_data(args.data)
    train_tokens, val_tokens = split_90_10(tokens)
    seconds = 3.0 if args.quick else args.seconds
    val = windows(val_tokens, np.random.default_rng(1234), 24 if args.quick else args.val_windows)
    rows, results = [], {}
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        cfg = matched_config(arch, tokenizer.vocab_size, args.rnn_layers, args.quick)
        model = build_model(cfg)
        settle(not args.no_settle and not args.quick)
        stats = train_for(model, train_tokens, seconds)
        val_loss, buckets = evaluate(model, val)
        text = sample(model, tokenizer)
        shape = f"{cfg.n_layers}x{cfg.d_model}"
        results[arch] = dict(shape=shape, parameters=model.num_parameters(), val_loss=val_loss,
                             loss_by_position=buckets, sample=text, **stats)
        rows.append([arch, shape, model.num_parameters(), stats["steps"], round(stats["tokens_per_s"]), val_loss,
                     *buckets])
        print(f"{arch} ({shape}, {model.num_parameters():,} parameters): val loss {val_loss:.4f}, "
              f"{stats['tokens_per_s']:,.0f} tokens/s, {stats['steps']} steps")
    headers = ["arch", "shape", "params", "steps", "tokens/s", "val loss",
               *[f"pos {i}-{i + BUCKET - 1}" for i in range(0, CONTEXT, BUCKET)]]
    table = format_table(headers, rows)
    print(table)
    if "transformer" in results:
        for arch in (a for a in results if a != "transformer"):
            gap = [r - t for r, t in zip(results[arch]["loss_by_position"],
                                         results["transformer"]["loss_by_position"], strict=True)]
            results[arch]["gap_to_transformer_by_position"] = gap
            print(f"{arch} - transformer loss by position: " + " ".join(f"{g:+.3f}" for g in gap))
    for arch, r in results.items():
        print(f"--- sample {arch} ---\n{r['sample']}")
    payload = dict(seconds_per_model=seconds, threads=args.threads, batch=BATCH, context=CONTEXT, results=results,
                   table=table)
    path = write_results("recurrent", payload, quick=args.quick)
    (results_dir(args.quick) / "recurrent.md").write_text(f"```\n{table}\n```\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
