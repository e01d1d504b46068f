"""`lmforge report RUN_DIR`: one self-contained report.html of a run (config, curves, throughput and MFU,
samples under each decoding rule, attention pictures, evaluation tables, checkpoint size)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import UserError
from lmforge.files import check_can_write


@dataclass
class ReportConfig:
    run_dir: str = field(default="", metadata={"help": "run folder (holds metrics.jsonl and checkpoint/)",
                                               "positional": True})
    out: str | None = field(default=None, metadata={"help": "HTML file to write; unset = RUN_DIR/report.html"})
    prompt: str | None = field(default=None, metadata={
        "help": "prompt for the samples and pictures; unset = a short one in the family's form"})
    base: str | None = field(default=None, metadata={
        "help": "base model of a PEFT fine-tune run (its checkpoint holds only the method's tensors)"})
    max_new_tokens: int = field(default=40, metadata={"help": "tokens per sample"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 1")


def run_report(cfg: ReportConfig) -> Path:
    if not cfg.run_dir:
        raise UserError("no run folder given; pass RUN_DIR (e.g. lmforge report runs/demo)")
    if cfg.out:
        check_can_write(cfg.out, "--out")
    from lmforge.inspect.report import write_report  # matplotlib only where a picture is drawn

    path = write_report(cfg.run_dir, cfg.out, cfg.prompt, cfg.max_new_tokens, cfg.seed, base=cfg.base)
    print(f"report -> {path}")
    return path
