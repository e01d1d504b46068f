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
MAX_CELLS = 20_000_000  # a bigger grid (e.g. 12 layers x 12 heads x 400 x 400) is more memory than picture
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


def _tick_positions(count: int) -> list[int]:
    step = max(1, count // 32)  # at most ~32 labels per panel stay readable
    return list(range(0, count, step))


def plot_attention(maps: list[AttentionMap], png: str | Path, title: str) -> Path:
    """A grid of panels, rows = layers, columns = heads, each queries x keys; masked cells grey. The grid is
    one image in one Axes (a figure with an Axes per head draws many times slower)."""
    layers = sorted({m.layer for m in maps})
    heads, queries, keys = maps[0].probs.shape
    gap = max(1, round(0.12 * max(queries, keys)))
    rows, columns = len(layers) * (queries + gap) - gap, heads * (keys + gap) - gap
    if rows * columns > MAX_CELLS:
        raise UserError(f"{len(layers)} layers x {heads} heads x {queries} x {keys} tokens is too large a picture; "
                        "use a shorter --prompt")
    values = np.full((rows, columns), np.nan, dtype=np.float32)
    hidden = np.zeros((rows, columns, 4), dtype=np.uint8)  # RGBA: grey where the mask hides a cell, else clear
    for m in maps:
        top = layers.index(m.layer) * (queries + gap)
        allowed = m.allowed.expand_as(m.probs).numpy()
        for head in range(heads):
            left = head * (keys + gap)
            panel = np.where(allowed[head], m.probs[head].numpy(), np.nan)
            values[top:top + queries, left:left + keys] = panel
            hidden[top:top + queries, left:left + keys][~allowed[head]] = (217, 217, 217, 255)
    scale = min(0.35, max(0.08, 6.0 / max(rows, columns)), 40.0 / max(rows, columns))  # inches per cell
    width, height = 1.6 + columns * scale, 1.5 + rows * scale
    fig = plt.figure(figsize=(width, height), dpi=100)
    ax = fig.add_axes((1.2 / width, 0.9 / height, columns * scale / width, rows * scale / height))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="auto")
    ax.imshow(hidden, interpolation="nearest", aspect="auto")
    xs = [h * (keys + gap) + i for h in range(heads) for i in _tick_positions(keys)]
    ax.set_xticks(xs, [maps[0].keys[i] for _ in range(heads) for i in _tick_positions(keys)], rotation=90,
                  fontsize=6)
    ys = [row * (queries + gap) + i for row in range(len(layers)) for i in _tick_positions(queries)]
    ax.set_yticks(ys, [maps[0].queries[i] for _ in layers for i in _tick_positions(queries)], fontsize=6)
    for head in range(heads):
        ax.text(head * (keys + gap) + keys / 2 - 0.5, -1, f"head {head}", ha="center", va="bottom", fontsize=8)
    for row, layer in enumerate(layers):
        ax.text(columns - 0.5 + gap / 2, row * (queries + gap) + queries / 2 - 0.5, f"layer {layer}",
                rotation=270, ha="left", va="center", fontsize=8)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.06, label="probability")
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
