"""`lmforge word2vec`: train skip-gram or CBOW word vectors on text files; `lmforge word2vec-query`: nearest
neighbours, analogies and the questions-words.txt score of a saved vectors file.

text files (one sentence per line) → lower-cased words → lmforge.word2vec (negative sampling, subsampling,
dynamic window, min-count vocabulary) → out_dir/vectors.txt (the word2vec text format: gensim's
KeyedVectors.load_word2vec_format reads it) and out_dir/word2vec.json (settings, vocabulary size, loss per
epoch, words/s, and the analogy scores when --analogies is given).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import UserError
from lmforge.files import check_can_create, check_file
from lmforge.word2vec import (
    Word2VecSettings,
    WordVectors,
    describe_speed,
    evaluate_analogies,
    read_sentences,
    train_word2vec,
)

VECTORS_FILE = "vectors.txt"
REPORT_FILE = "word2vec.json"
METHODS = ("add", "mul")


@dataclass
class Word2VecConfig(Word2VecSettings):
    data: list[str] = field(default_factory=list, metadata={"help": "text file(s), one sentence per line (required)"})
    out_dir: str = field(default="runs/word2vec", metadata={"help": "folder for vectors.txt and word2vec.json"})
    analogies: str | None = field(default=None, metadata={
        "help": "questions-words.txt to score the vectors on (3CosAdd and 3CosMul); unset = skip"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads; 1 (the C tool's one worker) is fastest unless batches are large and the CPU idle: "
                "small ops on a busy machine spin-wait"})


def run_word2vec(cfg: Word2VecConfig) -> dict[str, Any]:
    """Train, write the vectors and the report, print one line per epoch and the scores; returns the report."""
    check_can_create(cfg.out_dir, "--out_dir")
    if cfg.analogies:
        check_file(cfg.analogies, "analogy file")
    if cfg.threads < 1:
        raise UserError(f"--threads {cfg.threads} must be >= 1")
    torch.set_num_threads(cfg.threads)
    sentences = read_sentences(cfg.data)
    settings = Word2VecSettings(**{f.name: getattr(cfg, f.name) for f in fields(Word2VecSettings)})

    def progress(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{settings.epochs}: loss {loss:.4f}", flush=True)

    vectors, stats = train_word2vec(sentences, settings, progress)
    out = Path(cfg.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    vectors.save_text(out / VECTORS_FILE)
    report: dict[str, Any] = dict(settings=asdict(settings), data=list(cfg.data), vocabulary=len(vectors),
                                  words=stats.words, seconds=stats.seconds, words_per_s=stats.words_per_second,
                                  epoch_losses=stats.epoch_losses)
    print(f"{len(vectors):,} words x {settings.dim}: {describe_speed(stats)} -> {out / VECTORS_FILE}")
    if cfg.analogies:
        report["analogies"] = score_analogies(vectors, cfg.analogies)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def score_analogies(vectors: WordVectors, path: str, restrict: int = 300_000) -> dict[str, dict[str, float]]:
    """Both methods on the analogy file, printed as 'method: semantic, syntactic, total (coverage)'."""
    scores = {}
    for method in METHODS:
        s = scores[method] = evaluate_analogies(vectors, path, method, restrict).summary()
        print(f"analogies 3Cos{method.capitalize()}: semantic {s['semantic_accuracy']:.2f}%, syntactic "
              f"{s['syntactic_accuracy']:.2f}%, total {s['total_accuracy']:.2f}% of the {s['total_coverage']:.1f}% "
              "of questions the vocabulary covers")
    return scores


@dataclass
class Word2VecQueryConfig:
    vectors: str = field(default="", metadata={
        "help": "word2vec text file (lmforge word2vec's vectors.txt, or gensim's save_word2vec_format) (required)"})
    similar: list[str] = field(default_factory=list, metadata={"help": "words whose nearest neighbours to print"})
    analogy: list[str] = field(default_factory=list, metadata={
        "help": "'a b c' triples: a is to b as c is to ? (e.g. 'man king woman')"})
    method: str = field(default="add", metadata={"help": "analogy method: add (3CosAdd) | mul (3CosMul)"})
    top_k: int = field(default=10, metadata={"help": "answers per query"})
    analogies: str | None = field(default=None, metadata={"help": "questions-words.txt to score the vectors on"})
    restrict: int = field(default=300_000, metadata={"help": "analogy scoring: the most frequent words considered"})


def run_word2vec_query(cfg: Word2VecQueryConfig) -> dict[str, Any]:
    """Print and return {'similar': {word: [(w, cos)]}, 'analogy': {'a b c': [(w, score)]}, 'analogies': ...}."""
    if not cfg.vectors:
        raise UserError("no vectors given; pass --vectors VECTORS.txt (written by lmforge word2vec)")
    if cfg.method not in METHODS:
        raise UserError(f"--method '{cfg.method}' is not supported; choose add (3CosAdd) or mul (3CosMul)")
    triples = [_triple(text) for text in cfg.analogy]
    if not (cfg.similar or triples or cfg.analogies):
        raise UserError("nothing to ask; pass --similar WORD, --analogy 'a b c' or --analogies questions-words.txt")
    if cfg.top_k < 1:
        raise UserError(f"--top_k {cfg.top_k} must be >= 1")
    vectors = WordVectors.load_text(cfg.vectors)
    result: dict[str, Any] = {"similar": {}, "analogy": {}}
    for word in cfg.similar:
        found = result["similar"][word] = vectors.nearest(word.lower(), cfg.top_k)
        print(f"{word}: " + ", ".join(f"{w} {s:.3f}" for w, s in found))
    for a, b, c in triples:
        found = result["analogy"][f"{a} {b} {c}"] = vectors.analogy(a, b, c, cfg.method, cfg.top_k)
        print(f"{a} : {b} :: {c} : " + ", ".join(f"{w} {s:.3f}" for w, s in found))
    if cfg.analogies:
        result["analogies"] = score_analogies(vectors, cfg.analogies, cfg.restrict)
    return result


def _triple(text: str) -> tuple[str, str, str]:
    words = text.lower().split()
    if len(words) != 3:
        raise UserError(f"--analogy '{text}' needs three words 'a b c' (a is to b as c is to ?)")
    return words[0], words[1], words[2]
