"""`lmforge inspect`: pictures of a model as PNG files: attention maps, the next-token distribution under
each sampling rule, position patterns, a PCA of embeddings, and a run's loss curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.interop import load
from lmforge.models import Model
from lmforge.tokenizer import Tokenizer

WHATS = ("attention", "sampling", "positions", "embeddings", "loss")


@dataclass
class InspectConfig:
    model: str = field(default="", metadata={"help": "lmforge checkpoint or Hugging Face folder"})
    prompt: str | None = field(default=None, metadata={
        "help": "text the attention and sampling pictures read; unset = a short one in the family's form"})
    what: list[str] = field(default_factory=lambda: ["attention"], metadata={
        "help": f"pictures to draw: {' | '.join(WHATS)} | all (several: --what attention sampling)"})
    out: str = field(default="runs/inspect", metadata={"help": "folder for the PNG files"})
    temperature: float = field(default=0.8, metadata={"help": "sampling picture: the temperature shown"})
    top_k: int = field(default=10, metadata={"help": "sampling picture: the k shown"})
    top_p: float = field(default=0.9, metadata={"help": "sampling picture: the p shown"})
    tokens: list[str] = field(default_factory=list, metadata={
        "help": "embeddings: tokens/words to place; unset = the most frequent tokens of the run's data"})
    count: int = field(default=60, metadata={"help": "embeddings: how many frequent tokens/words to place"})
    word2vec: str | None = field(default=None, metadata={"help": "embeddings: also a word2vec text-format file"})
    metrics: str | None = field(default=None, metadata={
        "help": "loss: a metrics.jsonl; unset = the one in the model's run folder"})

    def __post_init__(self) -> None:
        whats = [w for item in self.what for w in item.split(",") if w]
        self.what = list(WHATS) if "all" in whats else whats
        unknown = [w for w in self.what if w not in WHATS]
        if unknown or not self.what:
            raise UserError(f"--what {' '.join(unknown) or '(empty)'} is not one of: {', '.join(WHATS)}, all")
        if self.count < 3:
            raise UserError(f"--count={self.count} must be >= 3 (a PCA picture needs at least 3 points)")


def metrics_file(cfg: InspectConfig) -> Path:
    """--metrics, else metrics.jsonl in the model folder or its run folder (model = RUN/checkpoint)."""
    if cfg.metrics:
        return Path(cfg.metrics)
    if not cfg.model:
        raise UserError("--what loss needs --metrics FILE or --model RUN/checkpoint")
    folder = Path(cfg.model)
    found = [f / "metrics.jsonl" for f in (folder, folder.parent) if (f / "metrics.jsonl").is_file()]
    if not found:
        raise UserError(f"no metrics.jsonl in '{folder}' or its parent; pass --metrics FILE")
    return found[0]


def load_model(path: str) -> tuple[Model, Tokenizer]:
    if not path:
        raise UserError("no model given; pass --model CHECKPOINT_FOLDER")
    model, tokenizer = load(path)
    if tokenizer is None:
        raise UserError(f"'{path}' has no tokenizer.json; the pictures label tokens with it")
    return model.eval(), tokenizer


def run_inspect(cfg: InspectConfig) -> list[Path]:
    """Draw each --what into --out; print and return the PNG paths."""
    check_can_create(cfg.out, "--out")
    from lmforge.inspect import (  # matplotlib only where a picture is drawn
        draw_attention,
        draw_embeddings,
        draw_loss,
        draw_positions,
        draw_sampling,
    )
    from lmforge.inspect.report import default_prompt

    metrics = metrics_file(cfg) if "loss" in cfg.what else None
    model, tokenizer = load_model(cfg.model) if any(w != "loss" for w in cfg.what) else (None, None)
    out = Path(cfg.out)  # created only once the inputs are known to be good
    out.mkdir(parents=True, exist_ok=True)
    pngs = [draw_loss(metrics, out)] if metrics is not None else []
    prompt = cfg.prompt if cfg.prompt is not None or model is None else default_prompt(model, tokenizer)
    for what in (w for w in cfg.what if w != "loss"):
        if what == "attention":
            pngs += draw_attention(model, tokenizer, prompt, out)
        elif what == "sampling":
            pngs.append(draw_sampling(model, tokenizer, prompt, out, cfg.temperature, cfg.top_k, cfg.top_p))
        elif what == "positions":
            pngs += draw_positions(model, out)
        elif what == "embeddings":
            pngs += draw_embeddings(model, tokenizer, out, cfg.tokens, cfg.count, Path(cfg.model).parent / "data",
                                    cfg.word2vec)
    for png in pngs:
        print(png)
    return pngs
