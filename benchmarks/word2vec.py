"""word2vec: lmforge's PyTorch skip-gram / CBOW against gensim 4.4's optimised C, same corpus, same run.

Corpus: every English text in ../shared/data, concatenated (one sentence per line, lmforge.word2vec.tokenize:
lower-cased words): tiny Shakespeare, DialogSum dialogues and summaries, the English side of WMT22 and Multi30k,
SST-2, the Alpaca instructions and outputs (alpaca_eval, seed tasks, code_alpaca), GSM8K questions and answers,
PIQA goals and solutions, hh-rlhf harmless test transcripts. Both trainers get the very same token lists.

Same settings for both: vector size, window, negatives, min_count, sample, epochs, alpha (gensim's defaults:
100, 5, 5, 5, 1e-3, 5, 0.025). Fair threads: one core each — gensim workers=1, torch.set_num_threads(1).
Reported per trainer and arch: analogy accuracy on questions-words.txt (semantic, syntactic, total; gensim's
convention: 300k most frequent words, case-insensitive, questions with unknown words skipped: coverage shows
how many were asked) by 3CosAdd and 3CosMul, one scorer for both (checked against gensim's own
evaluate_word_analogies on gensim's vectors), and training words/s (raw corpus words x epochs / seconds of
training; vocabulary building excluded for both).

    python benchmarks/word2vec.py                  # full: both archs, results/word2vec.json + .md
    python benchmarks/word2vec.py --arch skipgram  # one arch: results/word2vec-skipgram.json + .md
    python benchmarks/word2vec.py --quick          # seconds: a small slice, 1 epoch
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path
from typing import Any

import torch
from _common import SHARED_DATA, format_table, require_data, results_dir, settle, write_results

from lmforge.word2vec import (
    Word2VecSettings,
    WordVectors,
    evaluate_analogies,
    tokenize,
    train_word2vec,
)

ANALOGIES = SHARED_DATA / "analogy" / "questions-words.txt"


def _jsonl(path: Path, *keys: str) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [str(row[k]) for row in rows for k in keys if row.get(k)]


def _json_array(path: Path, *keys: str) -> list[str]:
    return [str(row[k]) for row in json.loads(path.read_text(encoding="utf-8")) for k in keys if row.get(k)]


def english_texts(root: Path = SHARED_DATA) -> dict[str, list[str]]:
    """Source name -> its texts (each may span several lines)."""
    sst = [line.split(" ", 1)[1] for split in ("train", "dev", "test")
           for line in (root / "sentiment" / f"sst2.{split}.txt").read_text().splitlines() if " " in line]
    seed_tasks = [str(x) for row in _jsonl_rows(root / "instruct" / "alpaca_seed_tasks.jsonl")
                  for x in [row["instruction"]] + [v for inst in row["instances"] for v in inst.values()] if x]
    return {
        "tinyshakespeare": [(root / "tinyshakespeare" / "input.txt").read_text()],
        "dialogsum": _jsonl(root / "dialogsum" / "dialogsum.dev.jsonl", "dialogue", "summary")
        + _jsonl(root / "dialogsum" / "dialogsum.test.jsonl", "dialogue", "summary1", "summary2", "summary3")
        + _jsonl(root / "dialogsum" / "dialogsum.hiddentest.dialogue.jsonl", "dialogue"),
        "wmt22-en": [(root / "translation" / f).read_text() for f in
                     ("wmt22.generaltest2022.en-de.src.en", "wmt22.generaltest2022.de-en.ref.A.en")],
        "multi30k-en": [(root / "translation" / f).read_text() for f in ("multi30k.test_2016_flickr.en",
                                                                         "multi30k.val.en")],
        "sst2": sst,
        "alpaca": _json_array(root / "instruct" / "alpaca_eval_text_davinci_003_outputs.json", "instruction", "output")
        + seed_tasks + _json_array(root / "instruct" / "code_alpaca_2k.json", "instruction", "input", "output"),
        "gsm8k": _jsonl(root / "fewshot" / "gsm8k.train.jsonl", "question", "answer")
        + _jsonl(root / "fewshot" / "gsm8k.test.jsonl", "question", "answer"),
        "piqa": _jsonl(root / "fewshot" / "piqa.valid.jsonl", "goal", "sol1", "sol2"),
        "hh-rlhf": _jsonl(root / "preference" / "hh-rlhf-harmless-base-test.jsonl.gz", "chosen", "rejected"),
    }


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def corpus(max_words: int | None = None) -> tuple[list[list[str]], dict[str, int]]:
    """Sentences (one per non-blank line) of all sources, and each source's word count."""
    sentences, words = [], {}
    for name, texts in english_texts().items():
        rows = [t for text in texts for line in text.splitlines() if (t := tokenize(line))]
        sentences += rows
        words[name] = sum(map(len, rows))
    if max_words is not None:
        kept, total = [], 0
        for row in sentences:
            if total >= max_words:
                break
            kept.append(row)
            total += len(row)
        sentences = kept
    return sentences, words


def run_gensim(sentences: list[list[str]], s: Word2VecSettings) -> tuple[WordVectors, float, float]:
    """gensim's vectors, its training seconds, and its own analogy score (total %, 3CosAdd) as a check of ours."""
    from gensim.models import Word2Vec

    model = Word2Vec(vector_size=s.dim, window=s.window, negative=s.negative, hs=0, min_count=s.min_count,
                     sample=s.sample, sg=int(s.arch == "skipgram"), cbow_mean=1, alpha=s.alpha,
                     min_alpha=s.min_alpha, workers=1, seed=s.seed)
    model.build_vocab(sentences)
    start = time.perf_counter()
    model.train(sentences, total_examples=len(sentences), epochs=s.epochs)
    seconds = time.perf_counter() - start
    own = 100.0 * model.wv.evaluate_word_analogies(str(ANALOGIES))[0]
    return WordVectors(model.wv.index_to_key, torch.from_numpy(model.wv.vectors.copy())), seconds, own


def score(vectors: WordVectors, methods: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {m: evaluate_analogies(vectors, ANALOGIES, method=m).summary() for m in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small slice, 1 epoch (seconds)")
    parser.add_argument("--arch", choices=("skipgram", "cbow", "both"), default="both")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads and gensim workers (same for both)")
    parser.add_argument("--batch_words", type=int, default=Word2VecSettings.batch_words)
    parser.add_argument("--no-settle", action="store_true", help="skip waiting for an idle CPU before timings")
    args = parser.parse_args()
    require_data(ANALOGIES, "the analogy set ships in ../shared/data/analogy")
    torch.set_num_threads(args.threads)
    sentences, words = corpus(max_words=60_000 if args.quick else None)
    total_words = sum(map(len, sentences))
    sources = ", ".join(f"{k} {v:,}" for k, v in words.items())
    print(f"corpus: {total_words:,} words, {len(sentences):,} sentences ({sources})")
    archs = ("skipgram", "cbow") if args.arch == "both" else (args.arch,)
    rows, results = [], {}
    for arch in archs:
        s = Word2VecSettings(arch=arch, epochs=1 if args.quick else args.epochs, batch_words=args.batch_words,
                             min_count=2 if args.quick else 5)
        settle(not args.no_settle and not args.quick)
        ours, stats = train_word2vec(sentences, s)
        settle(not args.no_settle and not args.quick)
        theirs, gensim_seconds, gensim_own = run_gensim(sentences, s)
        for name, vectors, seconds, methods in (("lmforge", ours, stats.seconds, ("add", "mul")),
                                                ("gensim", theirs, gensim_seconds, ("add", "mul"))):
            scores = score(vectors, methods)
            speed = total_words * s.epochs / seconds
            results[f"{arch}/{name}"] = dict(words_per_s=speed, seconds=seconds, vocab=len(vectors), analogies=scores)
            for method, sc in scores.items():
                rows.append([arch, name, f"3Cos{method.capitalize()}", len(vectors), sc["semantic_accuracy"],
                             sc["syntactic_accuracy"], sc["total_accuracy"], sc["total_coverage"], round(speed)])
        results[f"{arch}/gensim"]["own_evaluation_total"] = gensim_own
        print(f"{arch}: gensim's evaluate_word_analogies on its vectors: {gensim_own:.3f}% total (ours: "
              f"{results[f'{arch}/gensim']['analogies']['add']['total_accuracy']:.3f}%)")
        gap = results[f"{arch}/lmforge"]["analogies"]["add"]["total_accuracy"] - \
            results[f"{arch}/gensim"]["analogies"]["add"]["total_accuracy"]
        ratio = results[f"{arch}/gensim"]["words_per_s"] / results[f"{arch}/lmforge"]["words_per_s"]
        print(f"{arch}: lmforge - gensim accuracy (3CosAdd) {gap:+.2f} points; gensim is {ratio:.2f}x faster")
        results[f"{arch}/gap_points"], results[f"{arch}/gensim_speedup"] = gap, ratio
    headers = ["arch", "trainer", "method", "vocab", "semantic %", "syntactic %", "total %", "coverage %", "words/s"]
    table = format_table(headers, rows)
    print(table)
    payload = dict(corpus_words=total_words, sources=words, threads=args.threads, batch_words=args.batch_words,
                   epochs=1 if args.quick else args.epochs, results=results, table=table)
    name = "word2vec" if args.arch == "both" else f"word2vec-{args.arch}"
    path = write_results(name, payload, quick=args.quick)
    (results_dir(args.quick) / f"{name}.md").write_text(f"```\n{table}\n```\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
