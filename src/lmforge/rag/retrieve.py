"""Retrieval over a RagIndex: dense (FAISS inner product of normalised embeddings = cosine), BM25 (rank-bm25's
Okapi BM25 over lowercased word tokens) and hybrid (reciprocal-rank fusion of the two), each with scores.

BM25 tokenisation: the text lowercased, then its runs of Unicode word characters (letters, digits, underscore;
regex `\\w+`); no stemming, no stop words. Passages that share no token with the query get no BM25 score and
are not returned. Hybrid fuses the two rankings, each `depth` passages deep, by RRF: score(p) = sum over the
rankings holding p of 1 / (60 + rank), rank counted from 1 (Cormack, Clarke & Büttcher 2009).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from rank_bm25 import BM25Okapi

from lmforge.errors import UserError
from lmforge.rag.chunking import Chunk
from lmforge.rag.index import RagIndex

MODES = ("hybrid", "dense", "bm25")
RRF_K = 60
WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Passage:
    """A retrieved chunk and its score under the mode that found it (cosine, BM25 or RRF)."""

    chunk: Chunk
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.chunk.to_dict(), "where": self.chunk.where, "score": self.score}


def bm25_tokens(text: str) -> list[str]:
    return WORD.findall(text.lower())


def rrf(rankings: list[list[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion of id rankings (best first): (id, score), best first; ties keep first-seen order."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: -pair[1])


def dense(index: RagIndex, query: str, depth: int) -> list[tuple[int, float]]:
    """(chunk id, cosine) of the `depth` nearest chunks."""
    depth = min(depth, index.vectors.ntotal)
    if depth == 0:
        return []
    scores, ids = index.vectors.search(index.embedder.embed([query]), depth)
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]


def bm25(index: RagIndex, query: str, depth: int) -> list[tuple[int, float]]:
    """(chunk id, BM25 score) of the `depth` best-scoring chunks that share a token with the query."""
    order = sorted(index.chunks)
    if index.bm25_model is None:
        corpus = [bm25_tokens(index.chunks[i].text) for i in order]
        index.bm25_model = BM25Okapi(corpus) if any(corpus) else False
    terms = bm25_tokens(query)
    if not index.bm25_model or not terms:
        return []
    scores = index.bm25_model.get_scores(terms)
    best = np.argsort(-scores, kind="stable")[:depth]
    return [(order[i], float(scores[i])) for i in best if scores[i] > 0]


def search(index: RagIndex, query: str, k: int = 4, mode: str = "hybrid", depth: int | None = None
           ) -> list[Passage]:
    """The k best passages for `query`, best first. Hybrid fuses rankings `depth` deep (default max(50, 10k))."""
    if k < 1:
        raise UserError(f"k={k} must be >= 1 (the number of passages to retrieve)")
    if mode not in MODES:
        raise UserError(f"mode '{mode}' is not one of {', '.join(MODES)}")
    if not query.strip():
        raise UserError("the question is empty; ask something")
    if mode == "dense":
        found = dense(index, query, k)
    elif mode == "bm25":
        found = bm25(index, query, k)
    else:
        depth = depth or max(50, 10 * k)
        found = rrf([[i for i, _ in dense(index, query, depth)], [i for i, _ in bm25(index, query, depth)]])[:k]
    return [Passage(index.chunks[i], score) for i, score in found]
