"""Token windows over a document, measured in the EMBEDDER's tokens (so a chunk fits what embeds it).

A chunk covers `chunk_tokens` tokens; the next starts `chunk_tokens - overlap` tokens later. Character spans
are contiguous: a chunk begins where its first token begins (the first chunk at 0) and ends where the token
after its last begins (the last chunk at the end of the text), so the whitespace between tokens belongs to a
chunk and the chunks, less the part each shares with the one before, concatenate back to the text exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lmforge.errors import UserError
from lmforge.rag.documents import Document
from lmforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class Chunk:
    """A passage: its text, where it comes from (`source`, the character span [start, end) in the document's
    text, the 1-based first and last lines holding its non-blank text) and its id in the index."""

    id: int
    source: str
    text: str
    start: int
    end: int
    start_line: int
    end_line: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def where(self) -> str:
        """file:line or file:first-last, for citations."""
        lines = str(self.start_line) if self.start_line == self.end_line else f"{self.start_line}-{self.end_line}"
        return f"{self.source}:{lines}"


def check_chunking(chunk_tokens: int, overlap: int) -> None:
    if chunk_tokens < 1:
        raise UserError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if not 0 <= overlap < chunk_tokens:
        raise UserError(f"overlap={overlap} must be >= 0 and below chunk_tokens={chunk_tokens}")


def token_starts(tokenizer: Tokenizer, text: str) -> list[int]:
    """The character offset where each token of `text` begins, never decreasing (byte-level pieces of one
    character share its offset)."""
    try:
        offsets = tokenizer.backend.encode(text, add_special_tokens=False).offsets
    except Exception as exc:
        if type(exc) is Exception:  # tokenizers' bare error for a piece the vocabulary lacks:
            tokenizer.encode(text)  # Tokenizer.encode names the characters in a UserError
        raise
    starts, last = [], 0
    for begin, _ in offsets:
        last = max(last, begin)
        starts.append(last)
    return starts


def spans(starts: list[int], length: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) character spans of the windows over tokens beginning at `starts` in a text of `length`."""
    n, stride = len(starts), chunk_tokens - overlap
    out, first = [], 0
    while first < n:
        last = min(first + chunk_tokens, n)
        out.append((0 if first == 0 else starts[first], length if last == n else starts[last]))
        if last == n:
            break
        first += stride
    return out


def chunk_document(document: Document, tokenizer: Tokenizer, chunk_tokens: int, overlap: int,
                   first_id: int = 0) -> list[Chunk]:
    """The chunks of one document, numbered from first_id."""
    check_chunking(chunk_tokens, overlap)
    text = document.text
    chunks = []
    for number, (start, end) in enumerate(spans(token_starts(tokenizer, text), len(text), chunk_tokens, overlap)):
        piece = text[start:end]
        if document.whole_file:
            first = start + len(piece) - len(piece.lstrip())
            last = max(first, start + len(piece.rstrip()) - 1)
            start_line = document.line + text.count("\n", 0, first)
            end_line = document.line + text.count("\n", 0, last)
        else:  # a JSONL record sits on one line of its file
            start_line = end_line = document.line
        chunks.append(Chunk(first_id + number, document.source, piece, start, end, start_line, end_line))
    return chunks
