"""A RAG index folder, built and updated incrementally, written atomically.

    INDEX/vectors.faiss   FAISS IndexIDMap2 over IndexFlatIP: exact inner product of L2-normalised vectors
                          (= cosine), each vector under its chunk's id
    INDEX/chunks.jsonl    one line per chunk: id, source, text, character span, first/last line
    INDEX/manifest.json   embedder, chunk settings, and for every file its content hash and chunk ids

Re-indexing reads every file, keeps the chunks (and vectors) of files whose hash is unchanged, re-chunks and
re-embeds changed and new files, and drops files no longer among the documents: the index mirrors the DOCS of
the latest run. A different embedder or chunk setting than the manifest's rebuilds the whole index and says so.
Every run writes a complete new folder and swaps it in (`write_atomically`), so a crash leaves the old index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lmforge.checkpoint import write_atomically
from lmforge.errors import UserError
from lmforge.files import check_can_create, read_json_object, read_text
from lmforge.rag.chunking import Chunk, check_chunking, chunk_document
from lmforge.rag.documents import read_file
from lmforge.rag.embedder import Embedder

FORMAT = 1
VECTORS_FILE, CHUNKS_FILE, MANIFEST_FILE = "vectors.faiss", "chunks.jsonl", "manifest.json"


@dataclass
class IndexSettings:
    embedder: str
    chunk_tokens: int = 256
    overlap: int = 32
    text_field: str = "text"

    def differences(self, other: IndexSettings) -> list[str]:
        """'name: old -> new' for each setting that differs."""
        return [f"{name}: {getattr(other, name)} -> {getattr(self, name)}" for name in self.__dataclass_fields__
                if getattr(self, name) != getattr(other, name)]


@dataclass
class RagIndex:
    """The loaded index: settings, vectors, chunks by id and per-file state; `embedder` loads on first use."""

    folder: Path | None
    settings: IndexSettings
    vectors: Any  # faiss.IndexIDMap2
    chunks: dict[int, Chunk]
    files: dict[str, dict[str, Any]]
    next_id: int = 0
    device: str = "cpu"
    _embedder: Embedder | None = None
    bm25_model: Any = field(default=None, repr=False)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = Embedder.load(self.settings.embedder, self.device)
        return self._embedder

    @classmethod
    def empty(cls, settings: IndexSettings, dim: int, embedder: Embedder | None = None) -> RagIndex:
        return cls(None, settings, faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {}, {}, _embedder=embedder)

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder | None = None, device: str = "cpu") -> RagIndex:
        """Read an index folder; a folder that is not one is a UserError naming the fix."""
        folder = Path(folder).expanduser()
        if not (folder / MANIFEST_FILE).is_file():
            raise UserError(f"'{folder}' is not a rag index (no {MANIFEST_FILE}); build one with "
                            f"`lmforge rag index DOCS... --out {folder}`")
        manifest = read_json_object(folder / MANIFEST_FILE, "rag index manifest", "rebuild the index")
        if manifest.get("format") != FORMAT:
            raise UserError(f"'{folder}' holds a rag index of format {manifest.get('format')}, this lmforge reads "
                            f"{FORMAT}; rebuild it with `lmforge rag index`")
        try:
            settings = IndexSettings(**manifest["settings"])
            vectors = faiss.read_index(str(folder / VECTORS_FILE))
            rows = [json.loads(line) for line in read_text(folder / CHUNKS_FILE, "rag index chunks").splitlines()]
            chunks = {row["id"]: Chunk(**row) for row in rows}
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise UserError(f"rag index '{folder}' is damaged ({type(exc).__name__}: {exc}); rebuild it with "
                            "`lmforge rag index`") from None
        if vectors.ntotal != len(chunks):
            raise UserError(f"rag index '{folder}' is damaged ({vectors.ntotal} vectors, {len(chunks)} chunks); "
                            "rebuild it with `lmforge rag index`")
        if embedder is not None and embedder.name != settings.embedder:
            raise UserError(f"rag index '{folder}' was built with embedder '{settings.embedder}', not "
                            f"'{embedder.name}'; query it with the embedder that built it")
        return cls(folder, settings, vectors, chunks, manifest["files"], manifest["next_id"], device,
                   _embedder=embedder)

    def save(self, folder: str | Path) -> None:
        """Write the whole index to a temporary folder and swap it into `folder`'s place."""
        manifest = {"format": FORMAT, "settings": self.settings.__dict__, "dim": self.vectors.d,
                    "next_id": self.next_id, "chunks": len(self.chunks), "files": self.files}

        def write(tmp: Path) -> None:
            faiss.write_index(self.vectors, str(tmp / VECTORS_FILE))
            lines = (json.dumps(self.chunks[i].to_dict(), ensure_ascii=False) + "\n" for i in sorted(self.chunks))
            (tmp / CHUNKS_FILE).write_text("".join(lines), encoding="utf-8")
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

        write_atomically(folder, write)
        self.folder = Path(folder)

    def chunk_list(self) -> list[Chunk]:
        """The chunks in id order (the order BM25 scores them in)."""
        return [self.chunks[i] for i in sorted(self.chunks)]


@dataclass
class IndexReport:
    """What a run of `update_index` did, for the user and for tests."""

    unchanged: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    chunks_embedded: int = 0
    chunks_total: int = 0
    rebuilt: str = ""

    def summary(self) -> str:
        return (f"{len(self.added)} added, {len(self.changed)} changed, {len(self.removed)} removed, "
                f"{len(self.unchanged)} unchanged files; {self.chunks_embedded} chunks embedded, "
                f"{self.chunks_total} in the index")


def check_out(out: str | Path) -> None:
    """Refuse, before any work, an --out that cannot be created or that holds something other than an index
    (an update replaces the whole folder)."""
    out = Path(out).expanduser()
    check_can_create(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_FILE).is_file():
        raise UserError(f"--out '{out}' exists and is not a rag index; choose a new --out folder (it would be "
                        "replaced)")


def open_for_update(out: Path, settings: IndexSettings, embedder: Embedder, report: IndexReport) -> RagIndex:
    """The index at `out` to update, or an empty one: none there yet, or built with other settings."""
    check_out(out)
    if not (out / MANIFEST_FILE).is_file():
        return RagIndex.empty(settings, embedder.dim, embedder)
    old = RagIndex.load(out, None)
    differences = settings.differences(old.settings)
    if not differences and old.vectors.d == embedder.dim:
        old._embedder = embedder
        return old
    report.rebuilt = "; ".join(differences) or f"vector size: {old.vectors.d} -> {embedder.dim}"
    return RagIndex.empty(settings, embedder.dim, embedder)


def update_index(out: str | Path, files: list[Path], embedder: Embedder, chunk_tokens: int = 256,
                 overlap: int = 32, text_field: str = "text", log: Callable[[str], None] = print
                 ) -> tuple[RagIndex, IndexReport]:
    """Bring the index at `out` up to date with `files` (see the module docstring) and write it."""
    check_chunking(chunk_tokens, overlap)
    if chunk_tokens > embedder.max_tokens:
        raise UserError(f"chunk_tokens={chunk_tokens} exceeds what the embedder sees at once "
                        f"({embedder.max_tokens} tokens); use --chunk_tokens {embedder.max_tokens} or less")
    out = Path(out).expanduser()
    settings = IndexSettings(embedder.name, chunk_tokens, overlap, text_field)
    report = IndexReport()
    index = open_for_update(out, settings, embedder, report)
    if report.rebuilt:
        log(f"the index's settings changed ({report.rebuilt}): rebuilding all of it")
    new_chunks: list[Chunk] = []
    stale: list[int] = []
    seen: dict[str, dict[str, Any]] = {}
    for path in files:
        digest, documents = read_file(path, text_field)
        source, before = str(path), index.files.get(str(path))
        if before is not None and before["hash"] == digest:
            seen[source] = before
            report.unchanged.append(source)
            continue
        (report.changed if before is not None else report.added).append(source)
        stale += before["chunks"] if before is not None else []
        chunks = chunk_file(documents, embedder, settings, index.next_id + len(new_chunks))
        new_chunks += chunks
        seen[source] = {"hash": digest, "chunks": [c.id for c in chunks]}
    for source, before in index.files.items():
        if source not in seen:
            report.removed.append(source)
            stale += before["chunks"]
    apply_changes(index, new_chunks, stale, embedder)
    index.files, index.next_id = seen, index.next_id + len(new_chunks)
    report.chunks_embedded, report.chunks_total = len(new_chunks), len(index.chunks)
    if not index.chunks:
        raise UserError(f"the documents ({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) hold "
                        "no text to index; pass files with some text")
    index.save(out)
    return index, report


def chunk_file(documents: list[Any], embedder: Embedder, settings: IndexSettings, first_id: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    for document in documents:
        chunks += chunk_document(document, embedder.tokenizer, settings.chunk_tokens, settings.overlap,
                                 first_id + len(chunks))
    return chunks


def apply_changes(index: RagIndex, new_chunks: list[Chunk], stale: list[int], embedder: Embedder) -> None:
    """Drop the stale chunks' vectors and rows, embed and add the new ones."""
    if stale:
        index.vectors.remove_ids(np.asarray(stale, dtype=np.int64))
        for chunk_id in stale:
            del index.chunks[chunk_id]
    if new_chunks:
        vectors = embedder.embed([c.text for c in new_chunks])
        index.vectors.add_with_ids(vectors, np.asarray([c.id for c in new_chunks], dtype=np.int64))
        index.chunks.update({c.id: c for c in new_chunks})
    index.bm25_model = None
