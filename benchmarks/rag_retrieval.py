"""Retrieval quality and speed of `lmforge rag` on DialogSum: BM25, MiniLM dense and hybrid (RRF).

The labelled set: every DialogSum test dialogue is a document (one .txt file each, indexed by
`lmforge.rag.update_index` exactly as `lmforge rag index` does: 256-token chunks, 32 overlapping, MiniLM), and
each of its human summaries (three per dialogue) is a query whose one relevant document is that dialogue.
A query's ranking of documents is its ranking of chunks, each document at its best chunk's place, 50
chunks deep. Reported per retriever: recall@1, recall@5, MRR (reciprocal rank of the relevant dialogue, 0 when
it is not among the 50 chunks), and milliseconds per query; plus the time to build the index.

    python benchmarks/rag_retrieval.py            # 500 dialogues, 1500 queries (a few minutes on 2 cores)
    python benchmarks/rag_retrieval.py --quick    # 20 dialogues, their first summaries: a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import SHARED_DATA, format_table, require_data, settle, write_results

from lmforge.rag import Embedder, RagIndex, find_files, search, update_index

DATA = SHARED_DATA / "dialogsum" / "dialogsum.test.jsonl"
MODES = ("bm25", "dense", "hybrid")
DEPTH = 50  # chunks retrieved per query, before chunks are folded into documents


def load_pairs(limit: int | None, summaries: int) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({fname: dialogue}, [(summary, fname)]) from the DialogSum test split."""
    rows = [json.loads(line) for line in require_data(DATA, "DialogSum is read from ../shared/data/dialogsum")
            .read_text().splitlines() if line.strip()][:limit]
    dialogues = {row["fname"]: row["dialogue"] for row in rows}
    queries = [(row[f"summary{i}"], row["fname"]) for row in rows for i in range(1, summaries + 1)
               if row.get(f"summary{i}")]
    return dialogues, queries


def build(dialogues: dict[str, str], work: Path, chunk_tokens: int, overlap: int) -> tuple[RagIndex, float]:
    docs = work / "docs"
    docs.mkdir()
    for fname, dialogue in dialogues.items():
        (docs / f"{fname}.txt").write_text(dialogue, encoding="utf-8")
    embedder = Embedder.load()
    start = time.perf_counter()
    index, report = update_index(work / "index", find_files([str(docs)]), embedder, chunk_tokens, overlap,
                                 log=lambda message: None)
    seconds = time.perf_counter() - start
    print(f"indexed {len(dialogues)} dialogues: {report.chunks_total} chunks in {seconds:.1f} s")
    return index, seconds


def document_rank(index: RagIndex, query: str, relevant: str, mode: str) -> int | None:
    """1-based rank of the relevant dialogue among the documents of the query's top chunks (None: absent)."""
    seen: list[str] = []
    for passage in search(index, query, k=DEPTH, mode=mode, depth=DEPTH):
        name = Path(passage.chunk.source).stem
        if name not in seen:
            seen.append(name)
    return seen.index(relevant) + 1 if relevant in seen else None


def evaluate(index: RagIndex, queries: list[tuple[str, str]], mode: str) -> dict[str, Any]:
    search(index, queries[0][0], k=1, mode=mode)  # warm-up: BM25 statistics, first MiniLM call
    start = time.perf_counter()
    ranks = [document_rank(index, query, relevant, mode) for query, relevant in queries]
    seconds = time.perf_counter() - start
    n = len(ranks)
    return {"queries": n, "recall@1": sum(r == 1 for r in ranks) / n,
            "recall@5": sum(r is not None and r <= 5 for r in ranks) / n,
            "mrr": sum(1 / r for r in ranks if r is not None) / n, "ms_per_query": 1000 * seconds / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N test dialogues (default: all 500)")
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--overlap", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: one short query per call gains nothing from a second, shared core); "
                        "0 = PyTorch's default")
    parser.add_argument("--no-settle", action="store_true", help="do not wait for an idle CPU before timing")
    parser.add_argument("--quick", action="store_true", help="20 dialogues, one summary each: a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    limit, summaries = (20, 1) if args.quick else (args.limit, 3)
    dialogues, queries = load_pairs(limit, summaries)
    print(f"{len(queries)} queries (DialogSum test summaries) over {len(dialogues)} dialogues")
    with tempfile.TemporaryDirectory(prefix="lmforge-rag-bench-") as work:
        settle(not (args.no_settle or args.quick))
        index, index_seconds = build(dialogues, Path(work), args.chunk_tokens, args.overlap)
        results = {}
        for mode in MODES:
            settle(not (args.no_settle or args.quick))
            results[mode] = evaluate(index, queries, mode)
        chunks = len(index.chunks)
    rows = [[mode, r["recall@1"], r["recall@5"], r["mrr"], r["ms_per_query"]] for mode, r in results.items()]
    print(format_table(["retriever", "recall@1", "recall@5", "MRR", "ms/query"], rows))
    beats = all(results["hybrid"][m] > max(results["bm25"][m], results["dense"][m]) for m in ("recall@1", "mrr"))
    print(f"index: {len(dialogues)} dialogues, {chunks} chunks, {index_seconds:.1f} s "
          f"({1000 * index_seconds / len(dialogues):.1f} ms per dialogue)")
    print(f"hybrid beats both on recall@1 and MRR: {beats}")
    path = write_results("rag_retrieval", {
        "data": str(DATA), "dialogues": len(dialogues), "queries": len(queries), "chunks": chunks,
        "chunk_tokens": args.chunk_tokens, "overlap": args.overlap, "depth": DEPTH, "embedder": "all-MiniLM-L6-v2",
        "index_seconds": round(index_seconds, 2), "results": results, "hybrid_beats_both": beats}, args.quick)
    print(f"results -> {path}")


if __name__ == "__main__":
    main()
