"""The documents RAG indexes: .txt, .md and .py files whole, and each record of a .jsonl file (its text field).

Folders are walked recursively in sorted order; hidden entries (.git, .venv) and __pycache__ are skipped, as
are files of other kinds inside a folder. A file named directly must be one of the readable kinds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.corpus import jsonl_values
from lmforge.errors import UserError
from lmforge.files import read_text

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
SKIPPED_FOLDERS = ("__pycache__", "node_modules")


@dataclass(frozen=True)
class Document:
    """One text to chunk. `line` is the 1-based line of the file where `text` begins (a JSONL record's line);
    `whole_file` says whether chunk lines count from `line` (text files) or all stay on it (a JSONL record)."""

    source: str
    text: str
    line: int = 1
    whole_file: bool = True


def content_hash(data: str) -> str:
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def find_files(paths: list[str]) -> list[Path]:
    """The files to index under `paths` (files or folders), each once, in a stable order."""
    if not paths:
        raise UserError("no documents given; pass one or more files or folders (DOCS...)")
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if _wanted(p, path))
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise UserError(f"document '{path}' is a {path.suffix or 'suffix-less'} file; rag indexes "
                                f"{', '.join(SUFFIXES)} files: pass one of those or a folder")
            found.append(path)
        else:
            raise UserError(f"document '{path}' does not exist; check the path")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UserError(f"no {', '.join(SUFFIXES)} files under {', '.join(paths)}; pass files or folders that hold "
                        "some")
    return unique


def _wanted(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    hidden = any(part.startswith(".") or part in SKIPPED_FOLDERS for part in parts)
    return not hidden and path.is_file() and path.suffix.lower() in SUFFIXES


def read_file(path: Path, text_field: str = "text") -> tuple[str, list[Document]]:
    """(content hash, documents) of one file; a JSONL file gives one document per non-blank record."""
    raw = read_text(path, "document")
    source = str(path)
    if path.suffix.lower() != ".jsonl":
        return content_hash(raw), [Document(source, raw)] if raw.strip() else []
    documents = []
    for number, text in jsonl_values(path, text_field, "give each record one or pass --text_field NAME"):
        if not isinstance(text, str):
            raise UserError(f"{path}:{number} has no string field '{text_field}' ({type(text).__name__}); give "
                            "each record a text or pass --text_field NAME")
        if text.strip():
            documents.append(Document(source, text, line=number, whole_file=False))
    return content_hash(f"{text_field}\n{raw}"), documents
