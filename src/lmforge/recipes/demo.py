"""The main job: pre-train a small model on this Python's standard library, then sample from it.

Runs in a few minutes on 2 CPU cores and needs no download. Everything it does goes through
the same `pretrain` and `generate_text` a user would call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.generate import SamplingConfig, generate_text
from lmforge.recipes.pretrain import DataConfig, PretrainConfig, TokenizerConfig, pretrain
from lmforge.train import TrainConfig

STRATEGIES = {
    "greedy": SamplingConfig(greedy=True),
    "temperature 0.8": SamplingConfig(temperature=0.8),
    "top-k 40": SamplingConfig(temperature=1.0, top_k=40),
    "top-p 0.9": SamplingConfig(temperature=1.0, top_p=0.9),
}


@dataclass
class DemoConfig(PretrainConfig):
    out_dir: str = field(default="runs/demo", metadata={"help": "run folder (checkpoint, metrics, loss.png)"})
    data: DataConfig = field(default_factory=lambda: DataConfig(max_bytes=6_000_000))
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(vocab_size=2048, max_bytes=3_000_000))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=800, batch_size=16, lr=2e-3, warmup_steps=50, eval_every=200, log_every=20))
    overwrite: bool = field(default=True, metadata={"help": "replace an earlier demo run in out_dir"})
    prompt: str = field(default="import os\n\n\ndef ", metadata={"help": "text the samples continue"})
    max_new_tokens: int = field(default=80, metadata={"help": "tokens per sample"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})


def demo(cfg: DemoConfig) -> dict[str, str]:
    """Pre-train, then print one sample per decoding strategy; returns {strategy: text}."""
    run = pretrain(cfg)
    print(f"\ncheckpoint: {run.out_dir / 'checkpoint'}   loss curve: {run.out_dir / 'loss.png'}")
    samples = {}
    for name, strategy in STRATEGIES.items():
        sampling = SamplingConfig(**{**strategy.__dict__, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed})
        samples[name] = generate_text(run.model, run.tokenizer, cfg.prompt, sampling)[0]
        print(f"\n--- {name} ---\n{cfg.prompt}{samples[name]}")
    return samples
