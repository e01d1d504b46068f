"""`lmforge generate`: load a checkpoint and continue prompts (causal), answer inputs (seq2seq) with
any decoding strategy, fill in [MASK]s (masked LM), or write what a prompt's one <FILL> stands for (a causal
model pre-trained with --objective fim)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.files import read_text
from lmforge.generate import SamplingConfig, fill_mask, generate_text, infill
from lmforge.interop import load, load_adapter
from lmforge.models import CausalLM, MaskedLM, Seq2SeqLM
from lmforge.tokenizer import Tokenizer


@dataclass
class GenerateConfig(SamplingConfig):
    model: str = field(default="", metadata={"help": "lmforge checkpoint or Hugging Face folder (required)"})
    prompt: list[str] = field(default_factory=list, metadata={"help": "one or more prompts"})
    prompt_file: str | None = field(default=None, metadata={"help": "file with one prompt per line"})
    adapter: str | None = field(default=None, metadata={
        "help": "fine-tune output to apply to --model: lmforge method state (lora, prompt, ...) or a peft adapter"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    stream: bool = field(default=True, metadata={"help": "print text as it is generated (single prompt)"})


def read_lines(given: list[str], path: str | None, what: str, how: str) -> list[str]:
    """Texts from flags plus the non-blank lines of an optional file; at least one, or a clear error."""
    lines = list(given)
    if path:
        lines += [line for line in read_text(path, f"{what} file").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"no {what} given; pass {how}")
    return lines


def run_generate(cfg: GenerateConfig) -> list[str]:
    if not cfg.model:
        raise UserError("no model given; pass --model CHECKPOINT_FOLDER")
    prompts = read_lines(cfg.prompt, cfg.prompt_file, "prompt", "--prompt TEXT or --prompt_file FILE")
    model, tokenizer = load(cfg.model, pick_device(cfg.device))
    if cfg.adapter:
        model = load_adapter(model, cfg.adapter).eval()
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; generation needs one")
    sampling = SamplingConfig(**{k: getattr(cfg, k) for k in SamplingConfig.__dataclass_fields__})
    if any(FILL in prompt for prompt in prompts):  # fill-in-the-middle: the model writes what <FILL> stands for
        return [print_infill(model, tokenizer, prompt, sampling) for prompt in prompts]
    if isinstance(model, MaskedLM):  # an encoder "generates" by filling in its masks
        return [print_fills(prompt, fill_mask(model, tokenizer, prompt, cfg.top_k or 5)) for prompt in prompts]
    if isinstance(model, Seq2SeqLM):  # an answer to the input, not a continuation of it
        texts = generate_text(model, tokenizer, prompts, sampling)
        for prompt, text in zip(prompts, texts, strict=True):
            print(f"{prompt}\n=> {text}")
        return texts
    if len(prompts) == 1 and cfg.stream:
        sys.stdout.write(prompts[0])
        texts = generate_text(model, tokenizer, prompts, sampling,
                              on_text=lambda row, piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
        return texts
    texts = generate_text(model, tokenizer, prompts, sampling)
    for prompt, text in zip(prompts, texts, strict=True):
        print(f"{prompt}{text}\n{'-' * 40}")
    return texts


FILL = "<FILL>"


def print_infill(model: CausalLM, tokenizer: Tokenizer, prompt: str, sampling: SamplingConfig) -> str:
    """Fill the prompt's one <FILL> from the text on both sides; print the completed text, return the middle."""
    if prompt.count(FILL) != 1:
        raise UserError(f"the prompt has {prompt.count(FILL)} {FILL} markers; an infill fills exactly one, "
                        f"so write {FILL} once")
    prefix, suffix = prompt.split(FILL)
    middle = infill(model, tokenizer, prefix, suffix, sampling)
    print(f"{prefix}{middle}{suffix}\n{'-' * 40}")
    return middle


def print_fills(prompt: str, fills: list[list[tuple[str, float]]]) -> str:
    """Print each mask's guesses; return the prompt with every mask replaced by its best guess."""
    print(prompt)
    for number, guesses in enumerate(fills, start=1):
        print(f"  mask {number}: " + ", ".join(f"{token!r} {prob:.2f}" for token, prob in guesses))
    return " | ".join(guesses[0][0] for guesses in fills)
