"""`lmforge align ppo` and `lmforge align grpo`: RL fine-tuning of a causal LM against a reward, with a KL
penalty to its frozen reference (`lmforge.align.ppo`, `lmforge.align.grpo`).

--model (checkpoint or HF folder) is the policy; --method lora (or any PEFT method) trains an adapter whose
base is the reference, else the whole model trains against a frozen copy. --prompts is a text file (one
prompt per line; write "\\n" for a newline inside one) or a .jsonl with a prompt field. The reward is
--reward (compiles | fraction:CHARS | module:function) or --reward_model CHECKPOINT (`lmforge align reward`).
One training step is one minibatch: a rollout every ppo_epochs × minibatches steps. out_dir gets
metrics.jsonl (score, kl, beta, entropy, clip_frac, value_loss, completion_length, ...), checkpoint/ (the
policy as fine-tune saves it) and samples.json (the last rollout).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.align.grpo import GrpoSettings, grpo
from lmforge.align.ppo import PpoSettings, RLResult, iter_samples, ppo
from lmforge.align.rollout import reward_from
from lmforge.data.corpus import jsonl_values
from lmforge.errors import UserError
from lmforge.files import check_can_create, check_file, read_text
from lmforge.peft import METHODS, with_method
from lmforge.recipes.align_common import load_causal
from lmforge.recipes.finetune import MethodOptions
from lmforge.train import TrainConfig
from lmforge.train.loop import CHECKPOINT_DIR

SAMPLES_FILE = "samples.json"


@dataclass
class RLRunOptions:
    """What `align ppo` and `align grpo` read besides the algorithm's settings."""

    model: str = field(default="", metadata={"help": "policy: checkpoint or Hugging Face folder (required)"})
    prompts: str = field(default="", metadata={
        "help": "prompts: a text file, one per line ('\\n' = newline), or .jsonl with --prompt_field (required)"})
    prompt_field: str = field(default="prompt", metadata={"help": ".jsonl prompts: the field holding the prompt"})
    reward: str | None = field(default=None, metadata={
        "help": "compiles | fraction:CHARS | module:function (reward(prompts, completions) -> list[float])"})
    reward_model: str | None = field(default=None, metadata={"help": "reward-model checkpoint (align reward)"})
    method: str = field(default="full", metadata={
        "help": "full | lora | qlora | prompt | prefix | adapter | bitfit | selective (PEFT: the reference is "
                "the base with the adapter switched off)"})
    peft: MethodOptions = field(default_factory=MethodOptions)
    out_dir: str = field(default="runs/align_rl", metadata={"help": "run folder (checkpoint, metrics, samples)"})
    show_samples: int = field(default=4, metadata={"help": "samples of the last rollout printed at the end"})
    overwrite: bool = field(default=False, metadata={"help": "replace a checkpoint already in out_dir"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its checkpoint"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        steps=64, batch_size=1, lr=1e-5, warmup_steps=0, schedule="constant", weight_decay=0.0, log_every=4,
        eval_every=0))

    def check_run(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"method='{self.method}' is not one of: {', '.join(METHODS)}")
        if self.show_samples < 0:
            raise UserError(f"show_samples={self.show_samples} must be >= 0")


@dataclass
class PpoConfig(PpoSettings, RLRunOptions):
    out_dir: str = field(default="runs/align_ppo", metadata={"help": "run folder (checkpoint, metrics, samples)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_run()


@dataclass
class GrpoConfig(GrpoSettings, RLRunOptions):
    out_dir: str = field(default="runs/align_grpo", metadata={"help": "run folder (checkpoint, metrics, samples)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_run()


def read_prompts(path: str, prompt_field: str = "prompt") -> list[str]:
    """Prompts from a .jsonl (one record per line, the prompt in `prompt_field`) or a text file (one per line,
    '\\n' written for a newline inside a prompt; blank lines skipped)."""
    if path.endswith(".jsonl"):
        fix = f"give each line a string field '{prompt_field}' (or set --prompt_field)"
        prompts = []
        for number, value in jsonl_values(check_file(path, "prompts"), prompt_field, fix):
            if not isinstance(value, str):
                raise UserError(f"{path}:{number}: '{prompt_field}' is not a string; {fix}")
            prompts.append(value)
    else:
        prompts = [line.replace("\\n", "\n") for line in read_text(path, "prompts").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"'{path}' holds no prompts; give one per line (or .jsonl records with '{prompt_field}')")
    return prompts


def _prepare(cfg: RLRunOptions) -> tuple:
    if not cfg.model or not cfg.prompts:
        raise UserError("RL alignment needs --model (the policy) and --prompts FILE")
    out = Path(cfg.out_dir)
    check_can_create(out, "--out_dir")
    if (out / CHECKPOINT_DIR).exists() and not cfg.overwrite and not cfg.resume:
        raise UserError(f"'{out}' already holds a checkpoint; pass --resume true to continue it, --overwrite true "
                        "to replace it, or choose another --out_dir")
    reward = reward_from(cfg.reward, cfg.reward_model)  # a bad --reward fails before the model loads
    prompts = read_prompts(cfg.prompts, cfg.prompt_field)
    policy, tokenizer = load_causal(cfg.model, "--model", "RL alignment")
    policy = with_method(policy, cfg.method, dataclasses.asdict(cfg.peft))
    return policy, tokenizer, prompts, reward, out


def _finish(result: RLResult, cfg: RLRunOptions, out: Path, name: str) -> RLResult:
    (out / SAMPLES_FILE).write_text(json.dumps(result.samples, indent=1) + "\n")
    print(f"{name}: {result.steps} steps, {result.rollouts} rollouts in {result.seconds:.1f}s; last rollout: "
          + ", ".join(f"{k} {v:.4g}" for k, v in result.stats.items()))
    print(f"checkpoint: {out / CHECKPOINT_DIR}   metrics: {out / 'metrics.jsonl'}")
    for line in iter_samples(result, cfg.show_samples):
        print(line)
    return result


def _settings(cfg: PpoConfig | GrpoConfig, cls: type) -> PpoSettings | GrpoSettings:
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def run_ppo(cfg: PpoConfig) -> RLResult:
    """`lmforge align ppo`."""
    policy, tokenizer, prompts, reward, out = _prepare(cfg)
    result = ppo(policy, tokenizer, prompts, reward, _settings(cfg, PpoSettings), cfg.train, out_dir=out,
                 resume=cfg.resume)
    return _finish(result, cfg, out, "ppo")


def run_grpo(cfg: GrpoConfig) -> RLResult:
    """`lmforge align grpo`."""
    policy, tokenizer, prompts, reward, out = _prepare(cfg)
    result = grpo(policy, tokenizer, prompts, reward, _settings(cfg, GrpoSettings), cfg.train, out_dir=out,
                  resume=cfg.resume)
    return _finish(result, cfg, out, "grpo")
