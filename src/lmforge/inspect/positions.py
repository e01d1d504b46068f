"""Position patterns: the sinusoidal table and RoPE always (at the model's sizes: the theory), plus what the
model itself learned or uses (learned embeddings' similarity, T5's relative bias)."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.inspect.common import plt, save_figure
from lmforge.models import Model
from lmforge.nn.positions import Positions, Rotary, apply_rotary, rope_angles, sinusoidal_table


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


def _table_and_profile(png: Path, title: str, table: torch.Tensor, table_axes: tuple[str, str, str | None],
                       profile: torch.Tensor, profile_axes: tuple[str, str], **image: object) -> Path:
    """A position table as a heatmap (left) beside how a score changes with distance (right)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    shown = left.imshow(table.numpy(), aspect="auto", interpolation="nearest", **image)
    left.set_xlabel(table_axes[0])
    left.set_ylabel(table_axes[1])
    fig.colorbar(shown, ax=left, label=table_axes[2])
    right.plot(profile.numpy())
    right.set_xlabel(profile_axes[0])
    right.set_ylabel(profile_axes[1])
    right.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, png)


def _whose(used: bool) -> str:
    return " (this model's)" if used else " (theory)"


def plot_sinusoidal(length: int, dim: int, png: Path, used: bool) -> Path:
    table = sinusoidal_table(length, dim)
    return _table_and_profile(png, f"sinusoidal positions, {length} x {dim}{_whose(used)}", table,
                              ("channel (even: sin, odd: cos)", "position", None), table @ table[0],
                              ("distance from position 0", "P(0) · P(d)"), cmap="RdBu", vmin=-1, vmax=1)


def plot_rope(length: int, head_dim: int, theta: float, png: Path, used: bool) -> Path:
    angles = rope_angles(length, head_dim, theta) % (2 * torch.pi)
    return _table_and_profile(png, f"RoPE, head_dim {head_dim}, theta {theta:g}{_whose(used)}", angles,
                              ("dimension pair i (frequency theta^(-2i/d))", "position", "rotation angle mod 2π"),
                              rope_scores(length, head_dim, theta),
                              ("distance between query and key", "(R_m q) · (R_n q), q = 1"), cmap="twilight")


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
