"""Instruction data for fine-tuning: prompt–completion JSONL, Alpaca-style JSON, and any JSONL through
a template mapping (e.g. DialogSum's `dialogue` → `summary`); laid out plainly, in an instruction
format, or through the tokenizer's chat template; tokenised with the loss on completion tokens
only; optionally packed; several datasets mixed with sampling weights.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.data.batches import pad_batch
from lmforge.errors import UserError
from lmforge.files import parse_json, read_text
from lmforge.tokenizer import Tokenizer

IGNORE = -100
# Layouts of (instruction, input) pairs. "instruction" uses the ### section headers of the Alpaca format;
# "flan" is the plain question-then-"Answer:" style of FLAN's templates.
LAYOUTS = {
    "plain": ("{instruction}{input_sep}{input}", ""),
    "instruction": ("### Instruction:\n{instruction}\n\n{input_block}### Response:\n", "### Input:\n{input}\n\n"),
    "flan": ("{instruction}{input_sep}{input}\n\nAnswer: ", ""),
}


@dataclass
class Example:
    prompt: str
    completion: str


@dataclass
class DatasetSpec:
    """One dataset of a (multi-task) mixture."""

    path: str
    weight: float = 1.0
    prompt_template: str | None = None  # e.g. "Summarize the dialogue:\n{dialogue}\n" (record fields)
    completion_field: str | None = None  # e.g. "summary"
    limit: int | None = None


@dataclass
class Encoded:
    """Token ids of one example: the prompt part (no loss) and the completion part (loss)."""

    prompt: list[int]
    completion: list[int]


def _read_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; `where` names the file and the line (JSONL) or the record number (a JSON array)."""
    text = read_text(path, "data file")
    if path.suffix == ".json":
        records = parse_json(text, f"data file '{path}'", "fix it (an Alpaca-style JSON array of records)")
        if not isinstance(records, list):
            raise UserError(f"'{path}' must hold a JSON array of records (Alpaca style)")
        pairs = [(f"{path} record {number}", record) for number, record in enumerate(records, start=1)]
    else:
        pairs = [(f"{path}:{number}", parse_json(line, f"{path}:{number}", "fix or remove that line"))
                 for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for where, record in pairs:
        if not isinstance(record, dict):
            raise UserError(f"{where} is a JSON {type(record).__name__}, not a record ({{\"field\": ...}}); fix it")
    return pairs


def _fill(template: str, record: dict[str, Any], where: str) -> str:
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    missing = sorted(names - set(record))
    if missing:
        raise UserError(f"{where} has no field(s) {missing} that the template uses; its fields: {sorted(record)}")
    return template.format(**{k: record[k] for k in names})


def layout(instruction: str, input_text: str, style: str) -> str:
    """The prompt for an instruction (+ optional input) in one of LAYOUTS."""
    if style not in LAYOUTS:
        raise UserError(f"template='{style}' is not one of: {', '.join([*LAYOUTS, 'chat'])}")
    template, input_block = LAYOUTS[style]
    return template.format(instruction=instruction, input=input_text, input_sep="\n\n" if input_text else "",
                           input_block=input_block.format(input=input_text) if input_text else "")


def read_examples(spec: DatasetSpec, style: str = "instruction") -> list[Example]:
    """Examples of one file: prompt/completion records, Alpaca records, or records through the spec's template."""
    path = Path(spec.path)
    records = _read_records(path)[: spec.limit]
    if not records:
        raise UserError(f"'{path}' holds no examples")
    examples = []
    for where, record in records:
        if spec.prompt_template is not None:
            if spec.completion_field not in record:
                raise UserError(f"{where} has no completion field '{spec.completion_field}'; set completion_field")
            examples.append(Example(_fill(spec.prompt_template, record, where), str(record[spec.completion_field])))
        elif {"instruction", "output"} <= set(record):
            prompt = layout(str(record["instruction"]), str(record.get("input") or ""), style)
            examples.append(Example(prompt, str(record["output"])))
        elif {"prompt", "completion"} <= set(record):
            examples.append(Example(str(record["prompt"]), str(record["completion"])))
        else:
            raise UserError(f"{where} is neither prompt/completion nor instruction/input/output; give a "
                            "prompt_template and completion_field to map its fields "
                            f"{sorted(record)}")
    return examples


def render_chat(tokenizer: Tokenizer, prompt: str) -> str:
    """The prompt as one user turn through the tokenizer's chat template, ready for the assistant's reply."""
    if not tokenizer.chat_template:
        raise UserError("template='chat' needs a tokenizer with a chat_template in tokenizer_config.json; "
                        "use --template instruction instead")
    return tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)


def encode_examples(examples: list[Example], tokenizer: Tokenizer, max_length: int, chat: bool = False
                    ) -> list[Encoded]:
    """Token ids with EOS closing each completion; over-long examples lose prompt tokens from the left
    (the completion is what is learned), then completion tokens from the right."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    out = []
    for example in examples:
        prompt_text = render_chat(tokenizer, example.prompt) if chat else example.prompt
        prompt, completion = tokenizer.encode(prompt_text), tokenizer.encode(example.completion) + eos
        completion = completion[:max_length - 1]
        prompt = prompt[max(0, len(prompt) + len(completion) - max_length):]
        out.append(Encoded(prompt, completion))
    return out


def causal_rows(items: list[Encoded]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example for a decoder: next-token labels, -100 over the prompt."""
    rows = []
    for item in items:
        ids = item.prompt + item.completion
        targets = [IGNORE] * len(item.prompt) + item.completion
        rows.append((ids[:-1], targets[1:]))
    return rows


def pack(rows: list[tuple[list[int], list[int]]], length: int) -> list[tuple[list[int], list[int]]]:
    """Concatenate examples into rows of `length` tokens (fewer pad tokens, more examples per step).
    Attention crosses example boundaries, as in common packing; each example's loss still covers
    only its completion."""
    flat_ids = [t for ids, _ in rows for t in ids]
    flat_labels = [t for _, labels in rows for t in labels]
    return [(flat_ids[i:i + length], flat_labels[i:i + length]) for i in range(0, len(flat_ids), length)]


@dataclass
class InstructionBatches:
    """Callable: index -> a batch for `family` (causal or seq2seq), drawn from several datasets by weight;
    a pure function of (seed, index), so resume replays it exactly."""

    datasets: list[list[Encoded]]
    weights: list[float]
    batch_size: int
    pad_id: int
    family: str = "causal"
    pack_length: int | None = None
    seed: int = 0
    eos_id: int | None = None  # seq2seq: closes the encoder input
    rows: list[list[tuple[list[int], list[int]]]] = field(init=False)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.datasets) or min(self.weights) <= 0:
            raise UserError(f"data weights {self.weights} must be positive, one per dataset ({len(self.datasets)})")
        if self.family == "causal":
            self.rows = [causal_rows(d) for d in self.datasets]
            if self.pack_length:
                self.rows = [pack(r, self.pack_length) for r in self.rows]
        else:
            eos = [] if self.eos_id is None else [self.eos_id]
            self.rows = [[(item.prompt + eos, item.completion) for item in d] for d in self.datasets]
        self.probabilities = np.asarray(self.weights) / sum(self.weights)

    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, index))
        sources = rng.choice(len(self.rows), size=self.batch_size, p=self.probabilities)
        chosen = [self.rows[s][rng.integers(len(self.rows[s]))] for s in sources]
        ids, mask = pad_batch([c[0] for c in chosen], self.pad_id, side="right")
        labels, _ = pad_batch([c[1] for c in chosen], IGNORE, side="right")
        if self.family == "causal":  # right padding: real tokens never attend to it, so no mask is needed
            return {"input_ids": ids, "labels": labels}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @property
    def tokens_per_batch(self) -> int:
        lengths = [len(ids) for rows in self.rows for ids, _ in rows]
        return self.batch_size * int(np.mean(lengths))
