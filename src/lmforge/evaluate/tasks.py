"""Tasks as small YAML files: where the data is, how to read it, how to prompt, how to score.

A task file names a test split and (optionally) a pool the few-shot examples are drawn from; each split is
a file in one of the formats below, turned into records of string fields. Templates such as "{question}"
then make the prompt, the references and the choices from those fields, so a user's own data needs only a
copied YAML with new paths and field names. Relative paths are looked up next to the YAML, then under the
data root (`--data_root`, else $LMFORGE_DATA, else the `shared/data` folder beside the repository).

Formats: jsonl | json (a list of objects) | labelled ("<label> <text>" lines: fields label, text) |
lines (only `columns`) | text (the whole file as field `text`, for perplexity). `columns` adds one field per
line-aligned plain-text file (e.g. a labels file, or the two sides of a parallel corpus).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.evaluate.prompts import Example, PromptSpec, render
from lmforge.files import parse_json, read_text
from lmforge.generate import SamplingConfig
from lmforge.options import build, load_yaml

KINDS = ("multiple_choice", "generate", "perplexity")
FORMATS = ("auto", "jsonl", "json", "labelled", "lines", "text")
METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate": ("rouge", "bleu", "exact_match"),
           "perplexity": ("perplexity",)}
EXTRACTORS = ("none", "number", "first_line", "regex")
TASKS_DIR = "tasks"


@dataclass
class DataSpec:
    path: str | None = field(default=None, metadata={"help": "the split's file"})
    format: str = field(default="auto", metadata={"help": " | ".join(FORMATS) + " (auto: by suffix)"})
    columns: dict[str, str] = field(default_factory=dict, metadata={"help": "field -> line-aligned text file"})
    derive: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "new field -> {field, regex (first group is kept), remove (regex deleted from it)}"})

    @property
    def given(self) -> bool:
        return bool(self.path or self.columns)


def _default_generation() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=32, greedy=True)


@dataclass
class TaskSpec:
    name: str = ""
    description: str = ""
    kind: str = field(default="generate", metadata={"help": " | ".join(KINDS)})
    test: DataSpec = field(default_factory=DataSpec)
    pool: DataSpec = field(default_factory=DataSpec, metadata={"help": "few-shot pool; empty = the test split"})
    references: list[str] = field(default_factory=list, metadata={"help": "templates of the gold answer(s)"})
    choices: list[str] = field(default_factory=list, metadata={"help": "templates of the choices (multiple choice)"})
    label: str = field(default="label", metadata={"help": "field holding the right choice (index or text)"})
    pool_references: list[str] = field(default_factory=list, metadata={
        "help": "references in the pool when its fields differ from the test split's; empty = references"})
    metric: str = field(default="", metadata={"help": "headline metric; empty = the kind's first"})
    extract: str = field(default="none", metadata={"help": " | ".join(EXTRACTORS) + ": what of a generation counts"})
    extract_regex: str = field(default="", metadata={"help": "with extract: regex, the first group is the answer"})
    prompt: PromptSpec = field(default_factory=PromptSpec)
    generation: SamplingConfig = field(default_factory=_default_generation)


@dataclass
class Task:
    spec: TaskSpec
    source: str  # the YAML it came from
    data_root: Path
    folder: Path | None = None  # the YAML's own folder, searched first for relative paths

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def metric(self) -> str:
        return self.spec.metric or METRICS[self.spec.kind][0]

    def check_files(self) -> None:
        """Fail on a missing data file before a model is loaded."""
        for data in (self.spec.test, self.spec.pool):
            for relative in ([data.path] if data.path else []) + list(data.columns.values()):
                self.resolve(relative)

    def examples(self, limit: int | None = None) -> list[Example]:
        return self._load(self.spec.test, self.spec.references, limit)

    def pool(self) -> list[Example]:
        if not self.spec.pool.given:
            return self.examples()
        return self._load(self.spec.pool, self.spec.pool_references or self.spec.references, None)

    def texts(self) -> list[str]:
        """A perplexity task's text(s)."""
        return [r.get("text", "") for r in read_records(self.spec.test, self.resolve, self.name)]

    def resolve(self, relative: str) -> Path:
        return resolve_path(relative, self.folder, self.data_root, self.name)

    def _load(self, data: DataSpec, references: list[str], limit: int | None) -> list[Example]:
        records = read_records(data, self.resolve, self.name)
        if limit is not None:
            records = records[:limit]
        return [self._example(i, r, references) for i, r in enumerate(records)]

    def _example(self, index: int, fields: dict[str, str], references: list[str]) -> Example:
        refs = [render(t, fields, "references") for t in references]
        if self.spec.kind != "multiple_choice":
            return Example(index, fields, refs)
        choices = [render(t, fields, "choices") for t in self.spec.choices]
        return Example(index, fields, refs, choices, _label_index(fields, self.spec.label, choices, self.name))


def _label_index(fields: dict[str, str], key: str, choices: list[str], task: str) -> int:
    if key not in fields:
        raise UserError(f"task '{task}': the label field '{key}' is missing; fields are {', '.join(sorted(fields))}")
    value = str(fields[key]).strip()
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(choices):
        return int(value)
    if value in choices:
        return choices.index(value)
    raise UserError(f"task '{task}': label {value!r} is neither a choice index (0..{len(choices) - 1}) nor a choice")


# -- reading files --------------------------------------------------------------------------------------------------
def read_records(data: DataSpec, resolve: Any, task: str) -> list[dict[str, str]]:
    """The split as a list of {field: string}, columns merged in and derived fields added."""
    if not data.given:
        raise UserError(f"task '{task}' names no test data; give test.path or test.columns in its YAML")
    records = _read_file(resolve(data.path), data.format, task) if data.path else []
    for name, relative in data.columns.items():
        lines = read_text(resolve(relative), f"task '{task}' column file").splitlines()
        if records and len(lines) != len(records):
            raise UserError(f"task '{task}': column file '{relative}' has {len(lines)} lines but the data has "
                            f"{len(records)} records; they must be aligned line by line")
        records = records or [{} for _ in lines]
        for record, line in zip(records, lines, strict=True):
            record[name] = line
    return [_derive(r, data.derive, task) for r in records]


def _read_file(path: Path, fmt: str, task: str) -> list[dict[str, str]]:
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".json": "json"}.get(path.suffix, "text")
    if fmt not in FORMATS:
        raise UserError(f"task '{task}': data format '{fmt}' is not one of {', '.join(FORMATS)}")
    text = read_text(path, f"task '{task}' data file")
    if fmt == "text":
        return [{"text": text}]
    if fmt == "labelled":
        return [dict(zip(("label", "text"), line.split(" ", 1), strict=False))
                for line in text.splitlines() if line.strip()]
    if fmt == "lines":
        raise UserError(f"task '{task}': format 'lines' reads only `columns`; drop `path` or give another format")
    if fmt == "jsonl":
        rows = [parse_json(line, f"task '{task}': {path}:{number}", "fix or remove that line")
                for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    else:
        rows = parse_json(text, f"task '{task}': '{path}'", "fix the file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"task '{task}': '{path}' must hold JSON objects (one per line for jsonl)")
    return [{k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows]


def _derive(record: dict[str, str], rules: dict[str, Any], task: str) -> dict[str, str]:
    """New fields cut out of existing ones, e.g. GSM8K's final number after '####' and the reasoning before."""
    for name, rule in rules.items():
        if not isinstance(rule, dict) or "field" not in rule or rule.get("field") not in record:
            raise UserError(f"task '{task}': derive.{name} needs {{field: <existing field>, regex: ...}}; "
                            f"fields are {', '.join(sorted(record))}")
        value = record[rule["field"]]
        if rule.get("regex"):
            found = re.search(rule["regex"], value, re.DOTALL)
            value = (found.group(1) if found.groups() else found.group(0)) if found else ""
        if rule.get("remove"):
            value = re.sub(rule["remove"], "", value)
        record[name] = value.strip()
    return record


# -- finding data and tasks -----------------------------------------------------------------------------------------
def data_root(override: str | None = None) -> Path:
    """--data_root, else $LMFORGE_DATA, else shared/data beside the repository (or the working folder's)."""
    if override:
        return Path(override)
    if os.environ.get("LMFORGE_DATA"):
        return Path(os.environ["LMFORGE_DATA"])
    for candidate in (Path(__file__).resolve().parents[4] / "shared" / "data", Path.cwd().parent / "shared" / "data",
                      Path.cwd() / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return Path("shared") / "data"


def resolve_path(relative: str, folder: Path | None, root: Path, task: str) -> Path:
    path = Path(relative).expanduser()
    candidates = [path] if path.is_absolute() else [*([folder / path] if folder else []), root / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise UserError(f"task '{task}' needs '{relative}', which is not at {' or '.join(map(str, candidates))}; "
                    "pass --data_root DIR (or set LMFORGE_DATA) to the folder holding it")


def known_tasks() -> dict[str, Path]:
    """Built-in task name -> its YAML (shipped in lmforge/evaluate/tasks/)."""
    folder = Path(str(resources.files("lmforge.evaluate") / TASKS_DIR))
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def load_task(name_or_path: str, root: str | Path | None = None) -> Task:
    """A built-in task by name, or any task YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UserError(f"task file '{name_or_path}' does not exist; check the --task path")
        folder = path.resolve().parent
    elif name_or_path in known_tasks():
        path, folder = known_tasks()[name_or_path], None
    else:
        raise UserError(f"unknown task '{name_or_path}'; known tasks: {', '.join(known_tasks())}, perplexity "
                        "(with --data FILE), or a task YAML file")
    values = load_yaml(path)
    values.setdefault("name", path.stem)
    spec = build(TaskSpec, values)
    check_spec(spec)
    return Task(spec, str(path), Path(root) if root else data_root(), folder)


def perplexity_task(data: str, root: str | Path | None = None) -> Task:
    """The `--task perplexity --data FILE` shortcut: a whole text file, scored with a sliding window."""
    spec = TaskSpec(name=f"perplexity:{Path(data).name}", kind="perplexity", test=DataSpec(path=data, format="text"))
    return Task(spec, "perplexity", Path(root) if root else data_root(), Path.cwd())


def check_spec(spec: TaskSpec) -> None:
    """Fail on a bad task file before any model is loaded."""
    if not spec.test.given:
        raise UserError(f"task '{spec.name}' names no test data; give test.path or test.columns in its YAML")
    if spec.kind not in KINDS:
        raise UserError(f"task '{spec.name}': kind '{spec.kind}' is not one of {', '.join(KINDS)}")
    if spec.metric and spec.metric not in METRICS[spec.kind]:
        raise UserError(f"task '{spec.name}': metric '{spec.metric}' does not fit kind '{spec.kind}'; "
                        f"use one of {', '.join(METRICS[spec.kind])}")
    if spec.extract not in EXTRACTORS:
        raise UserError(f"task '{spec.name}': extract '{spec.extract}' is not one of {', '.join(EXTRACTORS)}")
    if spec.extract == "regex" and not spec.extract_regex:
        raise UserError(f"task '{spec.name}': extract: regex needs extract_regex")
    if spec.kind == "multiple_choice" and len(spec.choices) < 2:
        raise UserError(f"task '{spec.name}': a multiple_choice task needs at least 2 choices (templates)")
    if spec.kind == "generate" and not spec.references:
        raise UserError(f"task '{spec.name}': a generate task needs references (templates of the gold answer)")
