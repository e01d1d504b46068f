"""Reading the user's files and checking where outputs will go, with one-line errors.

A missing, misplaced, binary or malformed file becomes a `UserError` that names the file and the
fix, never a traceback from deep inside a decoder or parser; an output folder that cannot be
created is refused before any work starts, so a failed command leaves nothing half-written.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

SNIFF_BYTES = 8192  # as git does: a NUL or an invalid UTF-8 sequence in the head marks a binary file
TEXT_FIX = "pass a UTF-8 text file (convert one with `iconv -t UTF-8`)"


def check_file(path: str | Path, what: str = "file") -> Path:
    """`path` as a Path if it is an existing file; else a UserError saying what is there instead."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{what} '{path}' is a folder, not a file; pass the file itself")
    if not path.is_file():
        raise UserError(f"{what} '{path}' does not exist; check the path")
    return path


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:  # permissions, a file that vanished, an I/O error
        raise UserError(f"cannot read {what} '{path}': {exc.strerror or exc}; check that it is readable") from None


def _not_text(data: bytes, offset: int) -> str:
    reason = "a NUL byte: a binary file" if data[offset:offset + 1] == b"\0" else \
        f"byte 0x{data[offset]:02x}, invalid in UTF-8,"
    return f"is not UTF-8 text ({reason} at offset {offset})"


def not_text(path: str | Path, data: bytes, offset: int, what: str = "file") -> UserError:
    """The error for a file whose byte at `offset` shows it is not UTF-8 text."""
    return UserError(f"{what} '{path}' {_not_text(data, offset)}; {TEXT_FIX}")


def _first_bad_byte(data: bytes, final: bool) -> int | None:
    """Offset of the first NUL byte or invalid UTF-8 sequence, whichever comes first (None: clean text).
    final=False allows a character cut at the end, as in a file's head."""
    nul = data.find(b"\0")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError as exc:
        return nul if 0 <= nul < exc.start else exc.start
    return nul if nul >= 0 else None


def decode_text(data: bytes, path: str | Path, what: str = "file") -> str:
    """UTF-8 text without NUL bytes, or the `not_text` error naming the file and the offset."""
    if b"\0" not in data:
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("utf-8")  # the common case: one pass
    raise not_text(path, data, _first_bad_byte(data, final=True) or 0, what)


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole file as UTF-8 text, or a UserError naming it (missing, a folder, unreadable, binary)."""
    path = check_file(path, what)
    return decode_text(_read_bytes(path, what), path, what)


def text_problem(path: str | Path) -> str | None:
    """'is not UTF-8 text (why)' if the head of `path` shows a binary or otherwise encoded file, else None.
    Reads SNIFF_BYTES only, so checking every file of a large corpus up front stays cheap."""
    try:
        with Path(path).open("rb") as stream:
            head = stream.read(SNIFF_BYTES)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    bad = _first_bad_byte(head, final=False)
    return None if bad is None else _not_text(head, bad)


def parse_json(text: str, where: str, fix: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                        f"{fix}") from None


def read_json(path: str | Path, what: str = "file", fix: str = "fix the file or write it again") -> Any:
    """The parsed JSON of a file, or a UserError naming the file, the line and column, and `fix`."""
    return parse_json(read_text(path, what), f"{what} '{path}'", fix)


def read_json_object(path: str | Path, what: str = "file", fix: str = "fix the file or write it again"
                     ) -> dict[str, Any]:
    """Like read_json, for files that must hold one JSON object ({...}): configs, metadata."""
    value = read_json(path, what, fix)
    if not isinstance(value, dict):
        raise UserError(f"{what} '{path}' holds a JSON {type(value).__name__}, not the JSON object ({{...}}) "
                        f"expected; {fix}")
    return value


def _creation_problem(folder: Path) -> str | None:
    """Why `folder` could not be created (or written in, if it exists), else None. Creates nothing."""
    for existing in (folder, *folder.absolute().parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            return f"'{existing}' is a file, not a folder"
        if not os.access(existing, os.W_OK | os.X_OK):
            return f"no permission to write in '{existing}'"
        return None
    return None


def check_can_create(folder: str | Path, option: str) -> None:
    """Refuse now, before any work, an output folder that could not be created: a file where it or one of
    its parents should be, or a parent the user may not write in."""
    folder = Path(folder).expanduser()
    problem = _creation_problem(folder)
    if problem:
        raise UserError(f"cannot create {option} '{folder}': {problem}; choose another {option}")


def check_can_write(file: str | Path, option: str) -> None:
    """Like check_can_create, for an output file: its folder must be creatable and it must not be a folder."""
    file = Path(file).expanduser()
    problem = f"'{file}' is a folder" if file.is_dir() else _creation_problem(file.parent)
    if problem:
        raise UserError(f"cannot write {option} '{file}': {problem}; choose another {option}")


__all__ = ["TEXT_FIX", "check_can_create", "check_can_write", "check_file", "decode_text", "not_text", "parse_json",
           "read_json", "read_json_object", "read_text", "text_problem"]
