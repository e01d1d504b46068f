"""Reward hacking, made visible: PPO pushes a small SST-2 language model toward what a learned sentiment
classifier calls positive, at KL weights β ∈ {0, 0.05, 0.2}, while VADER — a lexicon judge the policy never
sees — says whether the text really became more positive.

- policy: a causal LM pre-trained here on the SST-2 training sentences (labels stripped, one document each, so
  EOS ends a sentence; `lmforge pretrain`, byte-level BPE of 1,000 tokens, the Llama-style `small` preset cut to
  3 layers of width 96 at context 48: 0.4M parameters, 500 steps of 16 windows), cached in runs/align-hacking/policy;
- reward: a `tiny-bert` encoder (2 layers, width 64) trained from scratch on SST-2's labels (`lmforge finetune
  --task classify`, 400 steps of 32, a WordPiece vocabulary of the same sentences), cached in
  runs/align-hacking/classifier; the reward is its P(positive) of prompt + continuation;
- judge: VADER's compound score (in [-1, 1]) of the same text;
- task: prompts are the first words of held-out SST-2 sentences (dev + test); PPO (`lmforge.align.ppo`, the
  one training loop) with the same seed, prompts and steps for every β.

Per rollout (against PPO steps): mean reward-model score, VADER compound, KL to the reference (summed per
completion, k1), distinct-2 (distinct word bigrams / all bigrams of the rollout) and length (words). At the end,
each policy and the reference answer the same held-out prompts (seeded sampling): the same five numbers, plus
samples side by side.

What happened (benchmarks/results/align_hacking.md; 40 rollouts of 32, lr 1e-3, 128 held-out prompts; the numbers
are deterministic, only the seconds depend on the machine):
- β = 0: the reward model's P(positive) climbs 0.54 → 0.93 while the KL to the reference grows to ~90 nats per
  completion, distinct-2 falls 0.95 → 0.74, and the continuations fill with runs of "lrb"/"rrb" — pieces of SST-2's
  "-lrb-"/"-rrb-" bracket tokens, which the classifier rewards and which no reader would write. That is the hack.
  VADER does not fall: it rises too (+0.15 → +0.32), since the policy also learns words like "best", which
  VADER's lexicon scores; the lexicon judge does not see that the text around them became gibberish.
- β = 0.05 and 0.2: the KL stays at ~4 and the text stays readable ("it is great !", "that is a good ."), but the
  reward barely moves (0.58, 0.64) and the completions shrink from ~8 words to ~2: with a KL summed over the
  completion's tokens, ending right away is the cheapest way to keep the penalty low. VADER drops with the text.

    python benchmarks/align_hacking.py            # the recorded run (~10 min on 2 idle cores; models cached)
    python benchmarks/align_hacking.py --quick    # smoke run: tiny models, a few steps, results to a temp folder
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import SHARED_DATA, format_table, require_data, write_results

from lmforge.align.logprobs import completion_logprobs, scoring_mode
from lmforge.align.ppo import PpoSettings, ppo
from lmforge.align.rollout import sample_rollout
from lmforge.checkpoint import save
from lmforge.config import ModelConfig
from lmforge.data.batches import pad_batch
from lmforge.generate import SamplingConfig
from lmforge.interop import load
from lmforge.models import build_model
from lmforge.recipes.finetune import FinetuneConfig, finetune
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.tokenizer import train_wordpiece
from lmforge.train import TrainConfig
from lmforge.train.loop import CHECKPOINT_DIR, METRICS_FILE

SST2 = SHARED_DATA / "sentiment"
RUN_DIR = Path(__file__).resolve().parents[1] / "runs" / "align-hacking"  # the repository's runs/
BETAS = (0.0, 0.05, 0.2)


@dataclass
class Scale:
    """Everything that differs between the recorded run and --quick."""

    sentences: int | None = None  # training sentences used (None: all 6,920)
    policy_model: dict[str, Any] = field(default_factory=lambda: dict(preset="small", context_length=48, d_model=96,
                                                                      n_layers=3, n_heads=4))
    policy_vocab: int = 1000
    policy_train: dict[str, Any] = field(default_factory=lambda: dict(steps=500, batch_size=16, lr=3e-3,
                                                                      warmup_steps=40, eval_every=250))
    classifier_model: dict[str, Any] = field(default_factory=lambda: dict(preset="tiny-bert", context_length=64))
    classifier_vocab: int = 2000
    classifier_train: dict[str, Any] = field(default_factory=lambda: dict(steps=400, batch_size=32, lr=1e-3,
                                                                          warmup_steps=40, eval_every=0))
    rollouts: int = 40
    rollout_batch: int = 32
    minibatches: int = 2
    ppo_epochs: int = 2
    max_new_tokens: int = 20
    lr: float = 1e-3
    prompts: int = 256  # training prompts
    eval_prompts: int = 128
    prompt_words: int = 3


QUICK = Scale(sentences=300, policy_model=dict(preset="tiny", context_length=64), policy_vocab=300,
              policy_train=dict(steps=20, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=0),
              classifier_model=dict(preset="tiny-bert", context_length=64), classifier_vocab=300,
              classifier_train=dict(steps=6, batch_size=8, lr=1e-3, warmup_steps=1, eval_every=0),
              rollouts=2, rollout_batch=8, minibatches=2, ppo_epochs=1, max_new_tokens=8, prompts=16,
              eval_prompts=8)


# --- data --------------------------------------------------------------------------------------------------

def labelled(path: Path) -> list[tuple[str, str]]:
    """(label, sentence) of SST-2's '<label> <text>' lines."""
    return [(line[0], line[2:].strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_lines(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{label} {text}\n" for label, text in rows))
    return path


def prompts_from(rows: list[tuple[str, str]], words: int, count: int, skip: int = 0) -> list[str]:
    """The first `words` words of sentences that are longer than that, distinct, in file order."""
    found = [" ".join(text.split()[:words]) for _, text in rows if len(text.split()) > words + 2]
    return list(dict.fromkeys(found))[skip:skip + count]


# --- the two trained models (cached) --------------------------------------------------------------------------

def train_policy(folder: Path, sentences: list[str], scale: Scale) -> Path:
    """The causal LM, pre-trained on the sentences (one JSONL record each, so EOS ends every sentence)."""
    if (folder / CHECKPOINT_DIR).is_dir():
        return folder / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "sentences.jsonl"
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences))
    pretrain(PretrainConfig(
        out_dir=str(folder), overwrite=True, data=DataConfig(sources=[str(corpus)], val_fraction=0.05),
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=scale.policy_vocab), model=dict(scale.policy_model),
        train=TrainConfig(**scale.policy_train, log_every=50, progress=False, device="cpu")))
    return folder / CHECKPOINT_DIR


def train_classifier(folder: Path, train_file: Path, dev_file: Path, scale: Scale) -> tuple[Path, float | None]:
    """The reward model: an encoder with a sequence head, trained from scratch on SST-2's labels."""
    if (folder / CHECKPOINT_DIR).is_dir():
        report = json.loads((folder / "eval.json").read_text())
        return folder / CHECKPOINT_DIR, report.get("accuracy")
    base = folder / "base"
    texts = [text for _, text in labelled(train_file)]
    tokenizer = train_wordpiece(texts, scale.classifier_vocab)
    cfg = ModelConfig.from_preset(scale.classifier_model["preset"], vocab_size=tokenizer.vocab_size,
                                  **{k: v for k, v in scale.classifier_model.items() if k != "preset"})
    save(base, build_model(cfg), tokenizer)
    result = finetune(FinetuneConfig(
        model=str(base), task="classify", data=[str(train_file)], eval_file=str(dev_file), from_scratch=True,
        out_dir=str(folder), overwrite=True, max_length=64,
        train=TrainConfig(**scale.classifier_train, log_every=50, progress=False, device="cpu")))
    return folder / CHECKPOINT_DIR, result.accuracy


class SentimentReward:
    """reward(prompts, completions) = the classifier's P(positive) of prompt + completion."""

    def __init__(self, folder: Path, batch_size: int = 64) -> None:
        self.model, self.tokenizer = load(folder)
        self.model.eval()
        self.positive = self.model.cfg.labels.index("1")
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer.encode_for_encoder(t, self.model.token_room) for t in texts[i:i + self.batch_size]]
            input_ids, mask = pad_batch(ids, pad, side="right")
            logits = self.model(input_ids, attention_mask=mask).logits
            out += torch.softmax(logits.float(), dim=-1)[:, self.positive].tolist()
        return out


# --- what is measured ------------------------------------------------------------------------------------------

class Vader:
    """The independent judges the policy never sees: VADER's compound score, and a readability proxy, the share
    of continuation words that are words of the SST-2 training sentences (gibberish and glued tokens are not)."""

    def __init__(self, vocabulary: set[str]) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer, self.vocabulary = SentimentIntensityAnalyzer(), vocabulary

    def __call__(self, texts: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(t)["compound"] for t in texts]

    def known_words(self, completions: list[str]) -> float:
        words = [w for c in completions for w in c.split()]
        return sum(w in self.vocabulary for w in words) / len(words) if words else 0.0


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct word n-grams over all n-grams of the texts (Li et al. 2016); 0 when there are none."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_metrics(prompts: list[str], completions: list[str], scores: list[float], vader: Vader) -> dict[str, float]:
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    mean = lambda values: sum(values) / max(len(values), 1)
    return {"reward": mean(scores), "vader": mean(vader(texts)), "distinct2": distinct_n(completions),
            "words": mean([len(c.split()) for c in completions]), "known_words": vader.known_words(completions)}


class Tracker:
    """Wraps the reward: PPO calls it exactly once per rollout, with that rollout's samples, so it records
    the rollout's metrics and a few of its samples on the way."""

    def __init__(self, reward: SentimentReward, vader: Vader) -> None:
        self.reward, self.vader = reward, vader
        self.rollouts: list[dict[str, Any]] = []

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        scores = self.reward(prompts, completions)
        row = {"rollout": len(self.rollouts), **text_metrics(prompts, completions, scores, self.vader),
               "samples": [p + c for p, c in zip(prompts[:3], completions[:3], strict=True)]}
        self.rollouts.append(row)
        return scores


@torch.no_grad()
def evaluate_policy(policy, reference, tokenizer, prompts: list[str], reward: SentimentReward, vader: Vader,
                    max_new_tokens: int, seed: int) -> tuple[dict[str, float], list[str]]:
    """Seeded samples on held-out prompts: the five numbers (KL = mean summed k1 log-ratio per completion)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)
    with scoring_mode(policy, reference):
        rollout = sample_rollout(policy, tokenizer, prompts, sampling)
        args = (rollout.input_ids, rollout.attention_mask, rollout.completion_mask)
        kl = (completion_logprobs(policy, *args) - completion_logprobs(reference, *args)).sum(1).mean()
    metrics = text_metrics(prompts, rollout.completions, reward(prompts, rollout.completions), vader)
    return {**metrics, "kl": float(kl)}, rollout.completions


def kl_per_rollout(run_dir: Path) -> list[float]:
    """The rollouts' KL from metrics.jsonl, logged once per rollout (log_every = steps per rollout)."""
    lines = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [float(line["kl"]) for line in lines if "kl" in line]


# --- the runs ----------------------------------------------------------------------------------------------------

def run_beta(beta: float, policy_dir: Path, reward: SentimentReward, vader: Vader, prompts: list[str],
             scale: Scale, out_dir: Path) -> dict[str, Any]:
    policy, tokenizer = load(policy_dir)
    settings = PpoSettings(rollout_batch=scale.rollout_batch, minibatches=scale.minibatches,
                           ppo_epochs=scale.ppo_epochs, beta=beta, max_new_tokens=scale.max_new_tokens, seed=0)
    spr = settings.steps_per_rollout
    train_cfg = TrainConfig(steps=scale.rollouts * spr, lr=scale.lr, warmup_steps=0, schedule="constant",
                            weight_decay=0.0, eval_every=0, log_every=spr, progress=False, device="cpu", seed=0)
    tracker = Tracker(reward, vader)
    start = time.perf_counter()
    result = ppo(policy, tokenizer, prompts, tracker, settings, train_cfg, out_dir=out_dir)
    seconds = time.perf_counter() - start
    kls = kl_per_rollout(out_dir)
    curve = [{**row, "step": row["rollout"] * spr, "kl": kls[row["rollout"]] if row["rollout"] < len(kls) else None}
             for row in tracker.rollouts]
    return {"beta": beta, "seconds": seconds, "steps": result.steps, "curve": curve, "policy": result.policy,
            "tokenizer": tokenizer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=SST2, help="folder with sst2.{train,dev,test}.txt")
    parser.add_argument("--run-dir", type=Path, default=RUN_DIR, help="where the policy and classifier are cached")
    parser.add_argument("--rollouts", type=int, help="PPO rollouts per beta (default 40)")
    parser.add_argument("--lr", type=float, help="PPO learning rate (default 1e-3)")
    parser.add_argument("--from-json", type=Path, help="only redo the .md and .png of a results JSON")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 on a crowded machine)")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps: checks the script runs")
    args = parser.parse_args()
    if args.from_json:
        render(args.from_json)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else Scale()
    scale.rollouts, scale.lr = args.rollouts or scale.rollouts, args.lr or scale.lr
    torch.manual_seed(0)
    hint = "pass --data to the folder holding SST-2"
    train_rows = labelled(require_data(args.data / "sst2.train.txt", hint))[:scale.sentences]
    held_out = labelled(require_data(args.data / "sst2.dev.txt", hint)) + \
        labelled(require_data(args.data / "sst2.test.txt", hint))
    run_dir = Path(tempfile.mkdtemp(prefix="align-hacking-")) if args.quick else args.run_dir
    start = time.perf_counter()
    policy_dir = train_policy(run_dir / "policy", [text for _, text in train_rows], scale)
    dev_file = write_lines(run_dir / "dev.txt", held_out[:872 if not args.quick else 64])
    classifier_dir, accuracy = train_classifier(run_dir / "classifier", write_lines(run_dir / "train.txt", train_rows),
                                                dev_file, scale)
    setup_s = time.perf_counter() - start
    print(f"policy {policy_dir}, reward classifier {classifier_dir} (dev accuracy {accuracy}); {setup_s:.0f}s")
    vocabulary = {w for _, text in train_rows for w in text.split()}
    reward, vader = SentimentReward(classifier_dir), Vader(vocabulary)
    prompts = prompts_from(held_out, scale.prompt_words, scale.prompts)
    eval_prompts = prompts_from(held_out, scale.prompt_words, scale.eval_prompts, skip=scale.prompts)
    reference, tokenizer = load(policy_dir)
    before, reference_samples = evaluate_policy(reference, reference, tokenizer, eval_prompts, reward, vader,
                                                scale.max_new_tokens, seed=1)
    runs = []
    for beta in BETAS:
        run = run_beta(beta, policy_dir, reward, vader, prompts, scale, run_dir / f"ppo-beta{beta}")
        final, samples = evaluate_policy(run.pop("policy"), reference, run.pop("tokenizer"), eval_prompts, reward,
                                         vader, scale.max_new_tokens, seed=1)
        runs.append({**run, "final": final, "eval_samples": samples})
        print(f"beta={beta:.2f}: reward {before['reward']:.3f} -> {final['reward']:.3f}, VADER {before['vader']:+.3f}"
              f" -> {final['vader']:+.3f}, KL {final['kl']:.2f}, distinct-2 {before['distinct2']:.3f} -> "
              f"{final['distinct2']:.3f}, words {final['words']:.1f}, known words {before['known_words']:.3f} -> "
              f"{final['known_words']:.3f} ({run['seconds']:.0f}s)", flush=True)
    report(args.quick, scale, accuracy, before, reference_samples, eval_prompts, runs)
    if args.quick:  # its models were throwaway ones
        shutil.rmtree(run_dir, ignore_errors=True)


# --- the report ----------------------------------------------------------------------------------------------------

COLUMNS = ("reward", "vader", "kl", "distinct2", "words", "known_words")


def report(quick: bool, scale: Scale, accuracy: float | None, before: dict[str, float], reference_samples: list[str],
           eval_prompts: list[str], runs: list[dict[str, Any]]) -> None:
    shown = range(min(6, len(eval_prompts)))
    samples = [{"prompt": eval_prompts[i], "reference": reference_samples[i],
                **{f"beta={run['beta']}": run["eval_samples"][i] for run in runs}} for i in shown]
    payload = {"settings": dict(vars(scale)), "classifier_dev_accuracy": accuracy, "reference": before,
               "runs": [{k: v for k, v in run.items() if k != "eval_samples"} for run in runs], "samples": samples}
    print(final_table(payload))
    path = write_results("align_hacking", payload, quick)
    render(path)


def render(path: Path) -> None:
    """The .md tables and the .png curves beside a results JSON (also: --from-json to redo them)."""
    payload = json.loads(path.read_text())
    path.with_suffix(".md").write_text(_markdown(payload))
    _plot(payload["runs"], path.with_suffix(".png"))
    print(f"results: {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")


def final_table(payload: dict[str, Any]) -> str:
    rows = [["reference (no PPO)", *(payload["reference"][c] for c in COLUMNS)]]
    rows += [[f"PPO beta={run['beta']}", *(run["final"][c] for c in COLUMNS)] for run in payload["runs"]]
    return format_table(["policy", "RM P(positive)", "VADER compound", "KL", "distinct-2", "words", "known words"],
                        rows)


def windows(curve: list[dict[str, Any]], count: int = 8) -> list[dict[str, Any]]:
    """The curve as `count` windows of consecutive rollouts, averaged (each rollout has other prompts, so one
    rollout's mean is noisy); a window is labelled with its last step."""
    size = max(1, len(curve) // count)
    out = []
    for i in range(0, len(curve), size):
        part = curve[i:i + size]
        mean = {k: sum(r[k] for r in part if r[k] is not None) / max(1, sum(r[k] is not None for r in part))
                for k in COLUMNS}
        out.append({"steps": f"{part[0]['step']}-{part[-1]['step']}", **mean})
    return out


def _markdown(payload: dict[str, Any]) -> str:
    s, accuracy = payload["settings"], payload["classifier_dev_accuracy"]
    lines = ["# Reward hacking, made visible (benchmarks/align_hacking.py)", "",
             f"PPO, {s['rollouts']} rollouts of {s['rollout_batch']} at lr {s['lr']}, the same seed and prompts for "
             f"every β; reward classifier dev accuracy {'?' if accuracy is None else f'{accuracy:.1f}'}%. At the end, "
             f"{s['eval_prompts']} held-out prompts, one seeded sample each:", "", "```", final_table(payload), "```",
             "", "## Curves (training rollouts, averaged over windows of rollouts)", ""]
    for run in payload["runs"]:
        lines += [f"### β = {run['beta']} ({run['seconds']:.0f} s)", "",
                  "| PPO steps | reward | VADER | KL | distinct-2 | words | known words |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {w['steps']} | {w['reward']:.3f} | {w['vader']:+.3f} | {w['kl']:.2f} | {w['distinct2']:.3f} | "
                  f"{w['words']:.1f} | {w['known_words']:.3f} |" for w in windows(run["curve"])]
        lines.append("")
    lines += ["## Samples (held-out prompts, bold)", ""]
    for sample in payload["samples"]:
        lines.append(f"**{sample['prompt']}**")
        lines += [f"- {name}: {sample['prompt']}{text}" for name, text in sample.items() if name != "prompt"]
        lines.append("")
    return "\n".join(lines) + "\n"


def _plot(runs: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"reward": "reward model P(positive)", "vader": "VADER compound", "kl": "KL to reference",
              "distinct2": "distinct-2", "words": "length (words)", "known_words": "share of known words"}
    fig, grid = plt.subplots(2, 3, figsize=(13, 6.5), dpi=100)
    axes = grid.ravel()
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for run in runs:
            points = [(row["step"], row[key]) for row in run["curve"] if row[key] is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=f"β={run['beta']}", linewidth=1.3)
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    main()
