"""A 2-D PCA of token embeddings (the most frequent tokens of the run's data, or a given list), and of
word2vec vectors read from the standard text format."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.data import load_shard
from lmforge.errors import UserError
from lmforge.files import read_text
from lmforge.inspect.common import plt, save_figure, token_label
from lmforge.models import Model
from lmforge.tokenizer import Tokenizer

DEFAULT_COUNT = 60


def pca_2d(vectors: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(N,2) coordinates on the two main axes of the centred vectors, and the share of variance each explains."""
    centred = vectors.float() - vectors.float().mean(dim=0)
    _, singular, axes = torch.linalg.svd(centred, full_matrices=False)
    variance = singular ** 2
    share = (variance[:2] / variance.sum().clamp(min=1e-12)).tolist()
    return centred @ axes[:2].T, share


def frequent_ids(tokenizer: Tokenizer, count: int, data_dir: Path | None) -> list[int]:
    """The `count` most frequent ordinary tokens of the run's token shard when there is one; otherwise the
    first ordinary ids (BPE ids follow merge order, which roughly follows frequency)."""
    specials = set(tokenizer.special_ids)
    if data_dir is not None and (data_dir / "meta.json").is_file():
        counts = np.bincount(np.asarray(load_shard(data_dir).train), minlength=tokenizer.vocab_size)
        return [int(i) for i in np.argsort(-counts, kind="stable") if int(i) not in specials and counts[i]][:count]
    return [i for i in range(tokenizer.vocab_size) if i not in specials][:count]


def token_vectors(model: Model, tokenizer: Tokenizer, words: Sequence[str], count: int,
                  data_dir: Path | None) -> tuple[torch.Tensor, list[str]]:
    """Input-embedding rows for the given words (a word of several tokens: their mean) or the frequent tokens."""
    table = model.embed.weight.detach().float().cpu()
    if not words:
        ids = frequent_ids(tokenizer, count, data_dir)
        return table[ids], [token_label(tokenizer, i) for i in ids]
    rows = []
    for word in words:
        ids = tokenizer.encode(word)
        if not ids:
            raise UserError(f"--tokens entry {word!r} encodes to no token; give visible text")
        rows.append(table[ids].mean(dim=0))
    return torch.stack(rows), list(words)


def read_word2vec(path: str | Path, words: Sequence[str], count: int) -> tuple[torch.Tensor, list[str]]:
    """Vectors from the word2vec text format (a 'count dim' header, then 'word v1 ... vdim' lines): the given
    words, or the first `count` (the format lists words by frequency)."""
    lines = read_text(path, "word2vec file").splitlines()
    try:
        dim = int(lines[0].split()[1])
        table = {}
        for number, line in enumerate(lines[1:], start=2):
            parts = line.rstrip().split(" ")
            if len(parts) != dim + 1:
                raise ValueError(f"line {number} has {len(parts) - 1} values, not {dim}")
            table[parts[0]] = [float(v) for v in parts[1:]]
    except (IndexError, ValueError) as exc:
        raise UserError(f"'{path}' is not in the word2vec text format ({exc}); export it with lmforge word2vec"
                        ) from None
    chosen = list(words) if words else list(table)[:count]
    missing = [w for w in chosen if w not in table]
    if missing:
        raise UserError(f"{', '.join(map(repr, missing[:5]))} not in '{path}'; choose words from its vocabulary")
    if len(chosen) < 3:
        raise UserError(f"'{path}' gives {len(chosen)} words; a PCA picture needs at least 3")
    return torch.tensor([table[w] for w in chosen]), chosen


def plot_pca(vectors: torch.Tensor, labels: list[str], png: str | Path, title: str) -> Path:
    if len(labels) < 3:
        raise UserError(f"{len(labels)} vectors to draw; a PCA picture needs at least 3 (give more --tokens)")
    points, share = pca_2d(vectors)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=100)
    ax.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=10, color="#1f77b4")
    for (x, y), label in zip(points.tolist(), labels, strict=True):
        ax.annotate(label, (x, y), fontsize=7, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, png)


def draw_embeddings(model: Model, tokenizer: Tokenizer, out_dir: str | Path, words: Sequence[str] = (),
                    count: int = DEFAULT_COUNT, data_dir: Path | None = None, word2vec: str | None = None
                    ) -> list[Path]:
    vectors, labels = token_vectors(model, tokenizer, words, count, data_dir)
    which = "given tokens" if words else f"{len(labels)} most frequent tokens"
    pngs = [plot_pca(vectors, labels, Path(out_dir) / "embeddings.png", f"token embeddings, PCA ({which})")]
    if word2vec:
        vectors, labels = read_word2vec(word2vec, words, count)
        pngs.append(plot_pca(vectors, labels, Path(out_dir) / "word2vec.png", f"word2vec vectors, PCA ({len(labels)} "
                             "words)"))
    return pngs
