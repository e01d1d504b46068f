"""Curves of a run from its metrics.jsonl: loss (train and validation), throughput and MFU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.files import read_text
from lmforge.inspect.common import plt, save_figure
from lmforge.plots import plot_loss_curve


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a missing, empty or broken file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' does not exist; give a run folder written by lmforge pretrain/finetune "
                        "(it holds metrics.jsonl)")
    records = []
    for number, line in enumerate(read_text(path, "metrics file").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number} is not JSON ({exc.msg}); the metrics file is damaged") from None
    if not any("loss" in r for r in records):
        raise UserError(f"'{path}' holds no training loss; train for at least one logged step")
    return records


def draw_loss(metrics: str | Path, out_dir: str | Path) -> Path:
    read_metrics(metrics)  # the one-line errors, and it guarantees a loss to draw
    return plot_loss_curve(metrics, Path(out_dir) / "loss.png", "loss: train and validation") or Path()


def draw_throughput(records: list[dict[str, Any]], png: str | Path) -> Path | None:
    """tokens/s and MFU against step, or None when the run logged neither."""
    speed = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
    mfu = [(r["step"], 100 * r["mfu"]) for r in records if "mfu" in r]
    if not speed:
        return None
    fig, left = plt.subplots(figsize=(7, 3.5), dpi=100)
    left.plot(*zip(*speed, strict=True), color="#1f77b4", label="tokens/s")
    left.set_xlabel("step")
    left.set_ylabel("tokens/s", color="#1f77b4")
    left.grid(alpha=0.3)
    if mfu:
        right = left.twinx()
        right.plot(*zip(*mfu, strict=True), color="#d62728", linestyle="--", label="MFU")
        right.set_ylabel("MFU (%)", color="#d62728")
    left.set_title("throughput and model FLOPs utilisation")
    fig.tight_layout()
    return save_figure(fig, png)
