"""Labelled text for classification: `<label> <text>` lines (as SST-2 ships) or JSONL records.

Labels are names (strings); ids follow the sorted order of the names in the training file, so the
same file always gives the same label ids. Batches are a pure function of (seed, index), as elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.data.batches import pad_batch
from lmforge.errors import UserError
from lmforge.files import parse_json, read_text
from lmforge.tokenizer import Tokenizer


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]


def read_labelled(path: str | Path, text_field: str = "text", label_field: str = "label") -> LabelledTexts:
    """Read `<label> <text>` lines, or `.jsonl` records with the given fields."""
    path = Path(path)
    texts, labels = [], []
    for number, line in enumerate(read_text(path, "labelled data file").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            record = parse_json(line, f"{path}:{number}", "fix or remove that line")
            if not isinstance(record, dict) or text_field not in record or label_field not in record:
                raise UserError(f"{path}:{number} lacks '{text_field}' or '{label_field}'; set --text_field/"
                                "--label_field to the record's field names")
            text, label = str(record[text_field]), str(record[label_field])
        else:
            label, _, text = line.strip().partition(" ")
            if not text:
                raise UserError(f"{path}:{number} is not '<label> <text>': {line[:60]!r}")
        texts.append(text)
        labels.append(label)
    if not texts:
        raise UserError(f"'{path}' holds no examples")
    return LabelledTexts(texts, labels)


def label_ids(labels: list[str], names: list[str], source: str) -> list[int]:
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise UserError(f"{source} has label(s) {unknown[:5]} the model was not trained on; known: {names}")
    return [index[label] for label in labels]


class ClassificationBatches:
    """Callable: index -> {"input_ids", "attention_mask", "labels"} of `batch_size` examples drawn at
    random (a pure function of (seed, index)); `in_order(i)` gives the i-th slice for evaluation."""

    def __init__(self, encoded: list[list[int]], labels: list[int], batch_size: int, pad_id: int,
                 seed: int = 0) -> None:
        if len(encoded) != len(labels) or not encoded:
            raise UserError("classification data needs one label per text and at least one example")
        self.encoded, self.labels, self.batch_size, self.pad_id, self.seed = encoded, labels, batch_size, pad_id, seed

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        ids, mask = pad_batch([self.encoded[i] for i in rows], self.pad_id, side="right")
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([self.labels[i] for i in rows])}

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        return self._batch(rng.integers(0, len(self.encoded), size=self.batch_size))

    def in_order(self) -> list[dict[str, torch.Tensor]]:
        return [self._batch(np.arange(i, min(i + self.batch_size, len(self.encoded))))
                for i in range(0, len(self.encoded), self.batch_size)]

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * int(np.mean([len(e) for e in self.encoded]))


def encode_labelled(data: LabelledTexts, tokenizer: Tokenizer, names: list[str], max_length: int,
                    source: str) -> tuple[list[list[int]], list[int]]:
    return ([tokenizer.encode_for_encoder(t, max_length) for t in data.texts],
            label_ids(data.labels, names, source))


__all__ = ["ClassificationBatches", "LabelledTexts", "encode_labelled", "label_ids", "read_labelled"]
