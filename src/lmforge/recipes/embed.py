"""`lmforge embed`: mean-pooled, L2-normalised sentence embeddings from an encoder — an lmforge
masked-family checkpoint or a Hugging Face BERT folder such as all-MiniLM-L6-v2."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.files import check_can_write
from lmforge.interop import load
from lmforge.models import embed_texts
from lmforge.recipes.generate import read_lines


@dataclass
class EmbedConfig:
    model: str = field(default="", metadata={"help": "encoder checkpoint or Hugging Face folder (required)"})
    text: list[str] = field(default_factory=list, metadata={"help": "one or more texts"})
    input_file: str | None = field(default=None, metadata={"help": "file with one text per line"})
    out: str | None = field(default=None, metadata={"help": ".npy or .jsonl to write; unset = print JSON lines"})
    max_length: int = field(default=256, metadata={"help": "tokens per text, [CLS] and [SEP] included"})
    batch_size: int = field(default=32, metadata={"help": "texts per forward pass"})
    normalize: bool = field(default=True, metadata={"help": "L2-normalise (cosine similarity = dot product)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})


def run_embed(cfg: EmbedConfig) -> torch.Tensor:
    if not cfg.model:
        raise UserError("no model given; pass --model ENCODER_FOLDER")
    texts = read_lines(cfg.text, cfg.input_file, "text", "--text TEXT or --input_file FILE")
    if cfg.out and Path(cfg.out).suffix not in (".npy", ".jsonl"):
        raise UserError(f"--out '{cfg.out}' must end in .npy or .jsonl")
    if cfg.out:
        check_can_write(cfg.out, "--out")
    model, tokenizer = load(cfg.model, pick_device(cfg.device))
    if tokenizer is None:
        raise UserError(f"'{cfg.model}' has no tokenizer.json; embedding needs one")
    vectors = embed_texts(model, tokenizer, texts, cfg.max_length, cfg.batch_size, cfg.normalize)
    if cfg.out and cfg.out.endswith(".npy"):
        np.save(cfg.out, vectors.numpy())
    else:
        lines = [json.dumps({"text": t, "embedding": [round(x, 6) for x in v.tolist()]}) for t, v in zip(
            texts, vectors, strict=True)]
        if cfg.out:
            Path(cfg.out).write_text("".join(line + "\n" for line in lines))
        else:
            print("\n".join(lines))
    if cfg.out:
        print(f"{len(texts)} embeddings of size {vectors.shape[1]} -> {cfg.out}")
    return vectors
