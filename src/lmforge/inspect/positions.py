"""Position patterns: the sinusoidal table and RoPE always (at the model's sizes: the theory), plus what the
model itself learned or uses (learned embeddings' similarity, T5's relative bias)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.inspect.common import plt, save_figure
from lmforge.models import Model
from lmforge.nn.positions import Positions, Rotary, apply_rotary, sinusoidal_table


def model_positions(model: Model) -> Positions | None:
    """The position module of the model's first stack (the encoder's when it has one), or None."""
    for name in ("encoder", "decoder"):
        positions = getattr(getattr(model, name, None), "positions", None)
        if isinstance(positions, Positions):
            return positions
    return None


def rope_scores(length: int, head_dim: int, theta: float) -> torch.Tensor:
    """(R_0 q)·(R_d q) for q = all ones, for each distance d < length: RoPE's slow decay with distance,
    computed with the model's own `Rotary` and `apply_rotary`."""
    rotary = Rotary(length, head_dim, theta)
    q = torch.ones(1, length, 1, head_dim)
    rotated = apply_rotary(q, *rotary(torch.arange(length)[None], torch.float32))[0, :, 0]
    return rotated @ rotated[0]


def plot_sinusoidal(length: int, dim: int, png: Path, used: bool) -> Path:
    table = sinusoidal_table(length, dim)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    image = left.imshow(table.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    left.set_xlabel("channel (even: sin, odd: cos)")
    left.set_ylabel("position")
    fig.colorbar(image, ax=left)
    right.plot((table @ table[0]).numpy())
    right.set_xlabel("distance from position 0")
    right.set_ylabel("P(0) · P(d)")
    right.grid(alpha=0.3)
    fig.suptitle(f"sinusoidal positions, {length} x {dim}" + (" (this model's)" if used else " (theory)"))
    fig.tight_layout()
    return save_figure(fig, png)


def plot_rope(length: int, head_dim: int, theta: float, png: Path, used: bool) -> Path:
    pairs = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    angles = torch.outer(torch.arange(length, dtype=torch.float32), 1.0 / theta ** pairs) % (2 * torch.pi)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    image = left.imshow(angles.numpy(), aspect="auto", cmap="twilight", interpolation="nearest")
    left.set_xlabel("dimension pair i (frequency theta^(-2i/d))")
    left.set_ylabel("position")
    fig.colorbar(image, ax=left, label="rotation angle mod 2π")
    right.plot(rope_scores(length, head_dim, theta).numpy())
    right.set_xlabel("distance between query and key")
    right.set_ylabel("(R_m q) · (R_n q), q = 1")
    right.grid(alpha=0.3)
    fig.suptitle(f"RoPE, head_dim {head_dim}, theta {theta:g}" + (" (this model's)" if used else " (theory)"))
    fig.tight_layout()
    return save_figure(fig, png)


def plot_learned(weight: torch.Tensor, png: Path) -> Path:
    unit = torch.nn.functional.normalize(weight.detach().float().cpu(), dim=-1)
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    image = ax.imshow((unit @ unit.T).numpy(), cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("position")
    ax.set_ylabel("position")
    ax.set_title("learned position embeddings: cosine similarity")
    fig.tight_layout()
    return save_figure(fig, png)


@torch.no_grad()
def plot_relative(positions: Positions, length: int, png: Path) -> Path:
    """Each head's learned bias as a function of key minus query distance (query in the middle)."""
    middle = length // 2
    bias = positions.relative(torch.tensor([middle]), torch.arange(length))[0, :, 0].float().cpu()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for head, row in enumerate(bias):
        ax.plot(range(-middle, length - middle), row.numpy(), label=f"head {head}", linewidth=1)
    ax.set_xlabel("key position − query position")
    ax.set_ylabel("bias added to the score")
    ax.set_title("relative-position bias (T5 buckets)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save_figure(fig, png)


def draw_positions(model: Model, out_dir: str | Path) -> list[Path]:
    cfg, out = model.cfg, Path(out_dir)
    positions = model_positions(model)
    kind = cfg.positions if positions is not None else "none"
    length = cfg.context_length
    pngs = [plot_sinusoidal(length, cfg.d_model, out / "positions_sinusoidal.png", kind == "sinusoidal"),
            plot_rope(length, max(2, cfg.head_dim - cfg.head_dim % 2), cfg.rope_theta, out / "positions_rope.png",
                      kind == "rope")]
    if kind == "learned":
        pngs.append(plot_learned(positions.learned.weight, out / "positions_learned.png"))
    elif kind == "relative":
        pngs.append(plot_relative(positions, length, out / "positions_relative.png"))
    return pngs
