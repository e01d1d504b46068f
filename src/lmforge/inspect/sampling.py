"""The next-token distribution before and after each sampling rule. The rules are
`lmforge.generate.filter_logits` itself, so the picture shows exactly what decoding keeps and cuts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import UserError
from lmforge.generate import filter_logits
from lmforge.inspect.common import plt, prompt_ids, save_figure, token_label
from lmforge.models import MaskedLM, Model, Seq2SeqLM
from lmforge.tokenizer import Tokenizer

BARS = 24  # most likely tokens drawn per panel


@dataclass
class RuleEffect:
    name: str
    start: torch.Tensor  # (vocab,) probabilities the rule starts from (after temperature, before any cut)
    kept: torch.Tensor  # (vocab,) bool: tokens the rule leaves
    after: torch.Tensor  # (vocab,) probabilities sampling draws from (renormalised over kept tokens)


@torch.no_grad()
def next_token_logits(model: Model, tokenizer: Tokenizer, prompt: str) -> tuple[torch.Tensor, str]:
    """(vocab,) logits of the next token and where they were read: after a decoder's prompt, at an encoder's
    first [MASK] (one is appended when the prompt has none), at an encoder-decoder's first answer token."""
    model.eval()
    device = model.embed.weight.device
    if isinstance(model, MaskedLM):
        mask = tokenizer.specials.get("mask")
        if mask is None:
            raise UserError("this tokenizer has no mask token; a masked LM's distribution is read at a mask")
        text = prompt if mask in prompt else f"{prompt} {mask}"
        ids = prompt_ids(model, tokenizer, text)
        where = ids.index(tokenizer.mask_id)
        return model(torch.tensor([ids], device=device)).logits[0, where].float().cpu(), f"at the first {mask}"
    if isinstance(model, Seq2SeqLM):
        ids = prompt_ids(model, tokenizer, prompt)
        memory = model.encode(torch.tensor([ids], device=device))
        start = torch.tensor([[model.cfg.decoder_start_id]], device=device)
        return model.decode(start, memory)[0, -1].float().cpu(), "first token of the answer"
    if not hasattr(model, "lm_head"):
        raise UserError(f"a {type(model).__name__} has no language-model head to sample from")
    ids = prompt_ids(model, tokenizer, prompt)
    return model(torch.tensor([ids], device=device)).logits[0, -1].float().cpu(), "next token after the prompt"


def rule_effects(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[RuleEffect]:
    """Each rule alone, then all three in generate's order (temperature → top-k → top-p)."""
    if temperature <= 0:
        raise UserError(f"--temperature={temperature} must be > 0 here (0 is greedy: nothing to picture)")
    rules = [("no rule (T=1)", 1.0, 0, 1.0), (f"temperature {temperature:g}", temperature, 0, 1.0),
             (f"top-k {top_k}", 1.0, top_k, 1.0), (f"top-p {top_p:g}", 1.0, 0, top_p),
             (f"all: T={temperature:g}, k={top_k}, p={top_p:g}", temperature, top_k, top_p)]
    effects = []
    for name, t, k, p in rules:
        filtered = filter_logits(logits, t, k, p)
        effects.append(RuleEffect(name, torch.softmax(logits.float() / t, dim=-1), torch.isfinite(filtered),
                                  torch.softmax(filtered, dim=-1)))
    return effects


def plot_sampling(effects: list[RuleEffect], labels: dict[int, str], png: str | Path, title: str) -> Path:
    """One bar panel per rule over the same most-likely tokens: kept tokens coloured at the probability they
    are drawn with, cut tokens grey at the probability they had."""
    order = torch.argsort(effects[0].start, descending=True)[:BARS].tolist()
    height = 1.9 * len(effects) + 1.6
    fig, axes = plt.subplots(len(effects), 1, figsize=(9, height), dpi=100, sharex=True)
    # fixed margins (inches) instead of tight_layout, which would render everything twice
    fig.subplots_adjust(left=0.08, right=0.98, bottom=1.0 / height, top=1 - 0.6 / height, hspace=0.45)
    for ax, effect in zip(axes, effects, strict=True):
        kept = [bool(effect.kept[i]) for i in order]
        heights = [float(effect.after[i] if k else effect.start[i]) for i, k in zip(order, kept, strict=True)]
        colours = ["#1f77b4" if k else "#c7c7c7" for k in kept]
        ax.bar(range(len(order)), heights, color=colours)
        cut_mass = float(effect.start[~effect.kept].sum())
        ax.set_title(f"{effect.name}: keeps {int(effect.kept.sum())} of {effect.kept.numel()} tokens, "
                     f"cuts {cut_mass:.1%} of the mass", fontsize=9)
        ax.set_ylabel("p", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(order)), [labels[i] for i in order], rotation=90, fontsize=7)
    fig.suptitle(f"{title}  (blue = kept, renormalised; grey = cut)", fontsize=10)
    return save_figure(fig, png)


def draw_sampling(model: Model, tokenizer: Tokenizer, prompt: str, out_dir: str | Path, temperature: float = 0.8,
                  top_k: int = 10, top_p: float = 0.9) -> Path:
    logits, where = next_token_logits(model, tokenizer, prompt)
    effects = rule_effects(logits, temperature, top_k, top_p)
    order = torch.argsort(logits, descending=True)[:BARS].tolist()
    labels = {i: token_label(tokenizer, i) for i in order}
    return plot_sampling(effects, labels, Path(out_dir) / "sampling.png", f"next-token distribution, {where}")
