"""Where text comes from: files, folders, JSONL fields, and the built-in corpus.

The built-in corpus is the Python standard library's own source on the user's machine, found
with `sysconfig`, so the main job trains on real text without downloading anything.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.files import TEXT_FIX, decode_text, read_text, text_problem

STDLIB = "stdlib"
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".jsonl", ".json", ".c", ".h", ".html", ".tex", ""}


# Third-party packages, test suites and generated tables (codec maps, pydoc topics) are not
# the hand-written Python a demo model should learn from.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "encodings", "pydoc_data", "idle_test"}
_STDLIB_MAX_FILE_BYTES = 300_000


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, minus tests, third-party and generated code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts) and p.stat().st_size <= _STDLIB_MAX_FILE_BYTES
    )
    if not files:
        raise UserError(f"found no standard-library sources under {root}; pass --data.sources with your own files")
    return files


def resolve_files(sources: list[str], seed: int = 0) -> list[Path]:
    """Expand sources (files, folders, or the word 'stdlib') into a file list, shuffled by `seed`.

    Shuffling the file order before the tail becomes the validation split keeps both splits
    drawn from the whole corpus rather than from its alphabetical end.
    """
    if not sources:
        raise UserError("no data sources given; pass --data.sources PATH (file, folder, .jsonl) or 'stdlib'")
    files: list[Path] = []
    for source in sources:
        if source == STDLIB:
            files.extend(stdlib_files())
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"folder '{source}' holds no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))})")
            files.extend(_text_files_of_folder(found, source))
        elif path.is_file():
            problem = text_problem(path)  # a file the user named: refuse it rather than train on its bytes
            if problem:
                raise UserError(f"data source '{path}' {problem}; {TEXT_FIX}")
            files.append(path)
        else:
            raise UserError(f"data source '{source}' does not exist; pass an existing file or folder, or 'stdlib'")
    if len(files) > 1:
        random.Random(seed).shuffle(files)
    return files


def _text_files_of_folder(found: list[Path], folder: str) -> list[Path]:
    """The files of a folder whose head is UTF-8 text. A folder may hold a stray binary (an executable, an
    image with a text-like name): skip each with a warning naming it, and refuse only a folder of nothing else."""
    kept, skipped = [], []
    for path in found:
        problem = text_problem(path)
        if problem:
            skipped.append(f"'{path}', which {problem}")
        else:
            kept.append(path)
    if not kept:
        raise UserError(f"folder '{folder}' holds no UTF-8 text file ({len(skipped)} skipped; the first: "
                        f"{skipped[0]}); {TEXT_FIX}")
    for problem in skipped:
        print(f"lmforge: warning: skipping {problem}", file=sys.stderr)
    return kept


def read_documents(files: list[Path], jsonl_field: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """Yield documents one at a time (a whole file, or one JSONL record's field), up to max_bytes."""
    total = 0
    for path in files:
        for doc in _documents_in(path, jsonl_field):
            if not doc:
                continue
            if max_bytes is not None and total + len(doc) > max_bytes:
                doc = doc[: max(0, max_bytes - total)]
                if doc:
                    yield doc
                return
            total += len(doc)
            yield doc


def _documents_in(path: Path, jsonl_field: str) -> Iterator[str]:
    if path.suffix != ".jsonl":
        yield read_text(path, "data source")  # strict: a bad byte past the sniffed head still names the file
        return
    for _, value in jsonl_values(path, jsonl_field, "pass --data.jsonl_field with the text field's name"):
        yield str(value)


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line of a JSONL file (gzipped when it ends in .gz), read
    strictly: a bad byte or a line that is not JSON is a one-line error naming `file:line`."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            line = decode_text(raw, f"{path}:{number}", "data line")
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number} is not valid JSON ({exc.msg}); fix or remove that line") from None


def jsonl_values(path: Path, field: str, fix: str) -> Iterator[tuple[int, Any]]:
    """(line number, record[field]) for every non-blank line of a JSONL file, read strictly; a line that is not
    JSON, not an object or without the field is a one-line error naming `file:line`, ending in `fix`."""
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or field not in record:
            raise UserError(f"{path}:{number} has no '{field}' field; {fix}")
        yield number, record[field]
