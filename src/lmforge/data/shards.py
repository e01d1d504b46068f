"""Tokenized corpora on disk: one flat memmap of token ids plus `meta.json`.

Documents are tokenized in batches and appended to the file as they stream past, so a corpus
larger than RAM works; the last `val_fraction` of tokens is the validation split (nanoGPT's
layout), and both splits are zero-copy views of the same memmap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.tokenizer import Tokenizer

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"


@dataclass
class TokenShard:
    train: np.ndarray
    val: np.ndarray
    meta: dict


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _batched(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build_shard(docs: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.1,
                batch_docs: int = 64, encode: Callable[[list[str]], list[list[int]]] | None = None) -> TokenShard:
    """Tokenize `docs` into out_dir/tokens.bin (EOS between documents) and describe it in meta.json.

    `encode` (default: the tokenizer's encode_batch) turns a batch of documents into ids, e.g. with FIM applied."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must be in [0, 1)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    # Documents end in EOS (decoders, T5) or BERT's [SEP]; both are special, so never masked.
    end = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.sep_id
    separator = [] if end is None else [end]
    tmp = out_dir / (TOKENS_FILE + ".tmp")
    count = docs_seen = 0
    with tmp.open("wb") as sink:
        for batch in _batched(docs, batch_docs):
            for ids in (encode or tokenizer.encode_batch)(batch):
                np.asarray(ids + separator, dtype=dtype).tofile(sink)
                count += len(ids) + len(separator)
            docs_seen += len(batch)
    if count == 0:
        tmp.unlink()
        raise UserError("the corpus is empty (no tokens); check --data.sources")
    tmp.replace(out_dir / TOKENS_FILE)
    meta = {"dtype": dtype.name, "tokens": count, "documents": docs_seen, "vocab_size": tokenizer.vocab_size,
            "val_tokens": int(count * val_fraction)}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return load_shard(out_dir)


def load_shard(folder: str | Path) -> TokenShard:
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        raise UserError(f"'{folder}' is not a token shard (no {META_FILE}); build one with lmforge pretrain")
    meta = read_json_object(folder / META_FILE, "token shard metadata", "delete the shard folder and rebuild it")
    tokens = np.memmap(folder / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r")
    split = len(tokens) - meta["val_tokens"]
    return TokenShard(train=tokens[:split], val=tokens[split:], meta=meta)
