"""The main job: pre-train a small model on this Python's standard library, then sample from it.

Runs in a few minutes on 2 CPU cores and needs no download. Everything it does goes through
the same `pretrain` and `generate_text` a user would call. `--family masked` pre-trains a BERT-style
encoder and shows its guesses for masked words; `--family seq2seq` a T5 that fills in spans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, fill_mask, generate_text
from lmforge.recipes.generate import print_fills
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
    prompt: str | None = field(default=None, metadata={
        "help": "text to continue (causal), with [MASK]s (masked) or <extra_id_N> spans (seq2seq); unset: default"})
    max_new_tokens: int = field(default=80, metadata={"help": "tokens per sample"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_new_tokens < 1:  # checked now: the samples come only after minutes of training
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


PROMPTS = {
    "causal": "import os\n\n\ndef ",
    "masked": "import os\n\n\ndef main ( ) : \n return os . path . [MASK] ( [MASK] )",
    "seq2seq": "import os\n\n\ndef <extra_id_0>(path):\n    return os.path.<extra_id_1>(path)",
}


def demo(cfg: DemoConfig) -> dict[str, str]:
    """Pre-train, then print one sample per decoding strategy (an encoder: its mask guesses), and write the run's
    report.html (`lmforge report`)."""
    from lmforge.inspect.report import write_report  # matplotlib only where a picture is drawn

    run = pretrain(cfg)
    print(f"\ncheckpoint: {run.out_dir / 'checkpoint'}   loss curve: {run.out_dir / 'loss.png'}")
    prompt = cfg.prompt or PROMPTS[cfg.family]
    if cfg.family == "masked":
        print()
        fills = {"fill-mask": print_fills(prompt, fill_mask(run.model, run.tokenizer, prompt))}
        print(f"\nreport: {write_report(run.out_dir, prompt=prompt)}")
        return fills
    samples, settings = {}, {}
    for name, strategy in STRATEGIES.items():
        sampling = SamplingConfig(**{**strategy.__dict__, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed})
        samples[name] = generate_text(run.model, run.tokenizer, prompt, sampling)[0]
        settings[name] = (sampling, samples[name])
        shown = f"{prompt}\n=> {samples[name]}" if cfg.family == "seq2seq" else f"{prompt}{samples[name]}"
        print(f"\n--- {name} ---\n{shown}")
    # The report shows these same samples rather than drawing new ones: it adds only its pictures' seconds.
    report = write_report(run.out_dir, prompt=prompt, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          samples=settings)
    print(f"\nreport: {report}")
    return samples
