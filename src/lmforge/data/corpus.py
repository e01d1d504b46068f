"""Where text comes from: files, folders, JSONL fields, and the built-in corpus.

The built-in corpus is the Python standard library's own source on the user's machine, found
with `sysconfig`, so the main job trains on real text without downloading anything.
"""

from __future__ import annotations

import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import UserError

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
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"data source '{source}' does not exist; pass an existing file or folder, or 'stdlib'")
    if len(files) > 1:
        random.Random(seed).shuffle(files)
    return files


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
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number} is not valid JSON ({exc.msg}); fix or remove that line") from None
            if not isinstance(record, dict) or jsonl_field not in record:
                raise UserError(
                    f"{path}:{number} has no '{jsonl_field}' field; pass --data.jsonl_field with the text field's name"
                )
            yield str(record[jsonl_field])
