"""`lmforge convert`: lmforge checkpoint ↔ Hugging Face folder, in either direction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.checkpoint import save
from lmforge.errors import UserError
from lmforge.files import check_can_create
from lmforge.interop import is_hf_folder, load, save_hf

FORMATS = ("hf", "lmforge")


@dataclass
class ConvertConfig:
    src: str = field(default="", metadata={"help": "model folder to read", "positional": True})
    dst: str = field(default="", metadata={"help": "folder to write", "positional": True})
    source_format: str = field(default="auto", metadata={"help": "hf | lmforge | auto (detect)", "flag": "from"})
    target_format: str = field(default="hf", metadata={"help": "hf | lmforge", "flag": "to"})


def convert(cfg: ConvertConfig) -> Path:
    if not cfg.src or not cfg.dst:
        raise UserError("convert needs SRC and DST folders: lmforge convert --from hf --to lmforge SRC DST")
    if cfg.target_format not in FORMATS or cfg.source_format not in (*FORMATS, "auto"):
        got = f"--from {cfg.source_format} --to {cfg.target_format}"
        raise UserError(f"--from/--to take {', '.join(FORMATS)} (--from also auto); got {got}")
    src = Path(cfg.src)
    detected = "hf" if is_hf_folder(src) else "lmforge"
    if cfg.source_format not in ("auto", detected):
        raise UserError(f"'{src}' is a {detected} folder, not {cfg.source_format}; drop --from or fix it")
    if Path(cfg.dst).resolve() == src.resolve():
        raise UserError("DST must differ from SRC")
    check_can_create(cfg.dst, "DST")
    model, tokenizer = load(src)
    if cfg.target_format == "hf":
        save_hf(cfg.dst, model, tokenizer, tokenizer_source=src)
    else:
        save(cfg.dst, model, tokenizer)
    print(f"{detected} {src} -> {cfg.target_format} {cfg.dst} ({model.num_parameters() / 1e6:.2f}M parameters)")
    return Path(cfg.dst)
