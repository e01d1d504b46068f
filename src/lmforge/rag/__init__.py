"""Retrieval-augmented generation: index documents (chunk by the embedder's tokens, embed, store in FAISS),
retrieve passages (dense, BM25, hybrid by reciprocal-rank fusion) and answer with checked [n] citations.

    index, report = update_index("idx", find_files(["docs/"]), Embedder.load())
    result = answer(RagIndex.load("idx"), "How do I ...?", model, tokenizer, k=4)
    print(result.answer, [c.where for c in result.cited])
"""

import importlib
from typing import Any

# Names load their module on first use: `lmforge rag --help` and the config dataclasses must not pay for FAISS.
_HOMES = {
    "RagAnswer": "answering", "answer": "answering", "build_prompt": "answering", "check_citations": "answering",
    "Chunk": "chunking", "chunk_document": "chunking", "Document": "documents", "find_files": "documents",
    "read_file": "documents", "DEFAULT_EMBEDDER": "embedder", "Embedder": "embedder", "minilm_folder": "embedder",
    "IndexReport": "index", "RagIndex": "index", "update_index": "index", "MODES": "retrieve", "Passage": "retrieve",
    "bm25_tokens": "retrieve", "rrf": "retrieve", "search": "retrieve",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lmforge.rag' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"lmforge.rag.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
