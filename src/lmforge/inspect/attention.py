"""Attention maps: the probabilities of every layer and head for one prompt, captured with
`lmforge.nn.attention.record_attention` (the module's own computation, not a re-implementation), drawn as a
grid with masked cells greyed and the tokens on the axes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.inspect.common import plt, prompt_ids, save_figure, token_label
from lmforge.models import Model, Seq2SeqLM
from lmforge.nn.attention import Attention, CrossAttention, record_attention
from lmforge.tokenizer import Tokenizer

KINDS = {"encoder": "encoder self-attention", "decoder": "decoder self-attention",
         "cross": "cross-attention (decoder over encoder)"}
SEQ2SEQ_ANSWER_TOKENS = 8  # decoder tokens shown for an encoder-decoder: its own greedy answer


@dataclass
class AttentionMap:
    kind: str  # a key of KINDS
    layer: int
    probs: torch.Tensor  # (heads, queries, keys)
    allowed: torch.Tensor  # (heads or 1, queries, keys) bool: False where the mask hides the cell
    queries: list[str]
    keys: list[str]


def _kind(name: str, module: torch.nn.Module) -> str:
    if isinstance(module, CrossAttention):
        return "cross"
    return "encoder" if name.startswith("encoder.") else "decoder"


def _layer(name: str) -> int:
    found = re.search(r"blocks\.(\d+)\.", name)
    return int(found.group(1)) if found else 0


@torch.no_grad()
def attention_maps(model: Model, tokenizer: Tokenizer, prompt: str) -> list[AttentionMap]:
    """Every attention call of one forward pass over the prompt (an encoder-decoder: over the prompt and its own
    greedy answer), in call order."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, Attention)}
    if not names:
        raise UserError(f"this {model.cfg.arch} model has no attention to draw; use --what sampling, positions, "
                        "embeddings or loss")
    model.eval()
    ids = prompt_ids(model, tokenizer, prompt)
    inputs = torch.tensor([ids], device=model.embed.weight.device)
    labels = {"encoder": ids, "decoder": ids}
    if isinstance(model, Seq2SeqLM):
        answer = generate(model, [ids], SamplingConfig(max_new_tokens=SEQ2SEQ_ANSWER_TOKENS, greedy=True),
                          eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0)[0]
        decoder_ids = [model.cfg.decoder_start_id, *answer]
        labels["decoder"] = decoder_ids
        with record_attention() as records:
            model(inputs, decoder_input_ids=torch.tensor([decoder_ids], device=inputs.device))
    else:
        with record_attention() as records:
            model(inputs)
    maps = []
    for record in records:
        name = names[record.module]
        kind = _kind(name, record.module)
        query_ids = labels["decoder" if kind == "cross" else kind]
        key_ids = labels["encoder" if kind == "cross" else kind]
        maps.append(AttentionMap(kind, _layer(name), record.probs[0].float().cpu(),
                                 record.allowed.reshape(-1, *record.allowed.shape[-2:]).cpu(),
                                 [token_label(tokenizer, i) for i in query_ids],
                                 [token_label(tokenizer, i) for i in key_ids]))
    return maps


def _ticks(ax: plt.Axes, labels: list[str], axis: str) -> None:
    step = max(1, len(labels) // 32)  # at most ~32 labels per axis stay readable
    positions = list(range(0, len(labels), step))
    if axis == "x":
        ax.set_xticks(positions, [labels[i] for i in positions], rotation=90, fontsize=6)
    else:
        ax.set_yticks(positions, [labels[i] for i in positions], fontsize=6)


def plot_attention(maps: list[AttentionMap], png: str | Path, title: str) -> Path:
    """One panel per (layer, head): rows are layers, columns heads; masked cells light grey."""
    layers = sorted({m.layer for m in maps})
    heads = maps[0].probs.shape[0]
    queries, keys = len(maps[0].queries), len(maps[0].keys)
    side = min(2.6, max(1.4, 0.09 * max(queries, keys)))
    # Fixed margins (inches) for the labels instead of tight_layout, which would render every axis twice.
    left, bottom, top = 1.3, 1.0, 0.6
    width, height = left + 0.2 + side * heads, bottom + top + side * len(layers)
    fig, axes = plt.subplots(len(layers), heads, figsize=(width, height), dpi=100, squeeze=False)
    fig.subplots_adjust(left=left / width, right=1 - 0.2 / width, bottom=bottom / height, top=1 - top / height,
                        wspace=0.08, hspace=0.08)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d9d9d9")
    for m in maps:
        row = layers.index(m.layer)
        allowed = m.allowed.expand_as(m.probs).numpy()
        for head in range(heads):
            ax = axes[row][head]
            shown = np.ma.masked_where(~allowed[head], m.probs[head].numpy())
            ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                _ticks(ax, m.queries, "y")
                ax.set_ylabel(f"layer {m.layer}\nquery", fontsize=8)
            if row == len(layers) - 1:
                _ticks(ax, m.keys, "x")
    fig.suptitle(f"{title}\n(rows sum to 1; grey = masked, never attended)", fontsize=9)
    return save_figure(fig, png)


def draw_attention(model: Model, tokenizer: Tokenizer, prompt: str, out_dir: str | Path) -> list[Path]:
    """attention_<kind>.png for each kind of attention the model has."""
    maps = attention_maps(model, tokenizer, prompt)
    pngs = []
    for kind, title in KINDS.items():
        chosen = [m for m in maps if m.kind == kind]
        if chosen:
            pngs.append(plot_attention(chosen, Path(out_dir) / f"attention_{kind}.png", title))
    return pngs
