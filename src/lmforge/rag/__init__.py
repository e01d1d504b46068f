"""Retrieval-augmented generation: index documents (chunk by the embedder's tokens, embed, store in FAISS),
retrieve passages (dense, BM25, hybrid by reciprocal-rank fusion) and answer with checked [n] citations.

    index, report = update_index("idx", find_files(["docs/"]), Embedder.load())
    result = answer(RagIndex.load("idx"), "How do I ...?", model, tokenizer, k=4)
    print(result.answer, [c.where for c in result.cited])
"""

from lmforge.rag.answering import RagAnswer, answer, build_prompt, check_citations
from lmforge.rag.chunking import Chunk, chunk_document
from lmforge.rag.documents import Document, find_files, read_file
from lmforge.rag.embedder import DEFAULT_EMBEDDER, Embedder, minilm_folder
from lmforge.rag.index import IndexReport, RagIndex, update_index
from lmforge.rag.retrieve import MODES, Passage, bm25_tokens, rrf, search

__all__ = ["DEFAULT_EMBEDDER", "MODES", "Chunk", "Document", "Embedder", "IndexReport", "Passage", "RagAnswer",
           "RagIndex", "answer", "bm25_tokens", "build_prompt", "check_citations", "chunk_document", "find_files",
           "minilm_folder", "read_file", "rrf", "search", "update_index"]
