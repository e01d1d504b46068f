"""word2vec (Mikolov et al. 2013): skip-gram and CBOW with negative sampling, in PyTorch.

What the C tool and gensim do, vectorised: a min-count vocabulary sorted by frequency; frequent-word
subsampling with the C tool's keep probability (sqrt(f/t) + 1) * t/f (t = sample x corpus words, f = count);
a dynamic window (each centre word draws its window uniformly from 1..window, so near words count more);
negatives drawn from the unigram distribution raised to 0.75; plain SGD on the touched rows with a learning
rate decaying linearly from alpha to min_alpha over the whole run.

The C tool updates after every (word, context) pair. Here a batch of `batch_words` centre words is done at
once: every pair's gradient is computed from the same snapshot of the two tables and added with index_add_
(the "Hogwild" staleness the C tool's threads already have, made explicit). Skip-gram follows gensim's
orientation: the context word's input vector predicts the centre word's output vector. CBOW predicts the centre
from the mean of its context vectors and gives each context word the whole error (the C tool and gensim's
cbow_mean=1).

Then: nearest neighbours by cosine, analogies by 3CosAdd and 3CosMul (Levy & Goldberg 2014), the analogy test
set of questions-words.txt scored as gensim scores it, and the word2vec text format gensim reads.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.errors import UserError
from lmforge.files import check_file, read_text

ARCHS = ("skipgram", "cbow")
SEMANTIC_SECTIONS = 5  # questions-words.txt: the first five sections are semantic, the "gram*" ones syntactic
COSMUL_EPSILON = 1e-3  # Levy & Goldberg's epsilon, against division by zero
WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*")


@dataclass
class Word2VecSettings:
    """The hyperparameters, named and defaulted as in gensim 4 (vector_size, window, negative, ...)."""

    arch: str = field(default="skipgram", metadata={"help": "skipgram | cbow"})
    dim: int = field(default=100, metadata={"help": "vector size"})
    window: int = field(default=5, metadata={"help": "widest context distance (each centre draws 1..window)"})
    negative: int = field(default=5, metadata={"help": "negative samples per positive"})
    min_count: int = field(default=5, metadata={"help": "drop words seen fewer times"})
    sample: float = field(default=1e-3, metadata={"help": "subsampling threshold of frequent words; 0 = off"})
    epochs: int = field(default=5, metadata={"help": "passes over the corpus"})
    alpha: float = field(default=0.025, metadata={"help": "initial learning rate"})
    min_alpha: float = field(default=1e-4, metadata={"help": "final learning rate (linear decay)"})
    batch_words: int = field(default=256, metadata={"help": "centre words updated together (from one snapshot)"})
    seed: int = field(default=1, metadata={"help": "random seed (init, subsampling, windows, negatives)"})

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"arch='{self.arch}' is not supported; choose one of: {', '.join(ARCHS)}")
        for name in ("dim", "window", "negative", "min_count", "epochs", "batch_words"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name}={value!r} must be a positive integer")
        if self.sample < 0 or self.alpha <= 0 or not 0 <= self.min_alpha <= self.alpha:
            raise UserError(f"need sample >= 0 and 0 <= min_alpha <= alpha, alpha > 0; got sample={self.sample}, "
                            f"alpha={self.alpha}, min_alpha={self.min_alpha}")


# -- corpus and vocabulary ---------------------------------------------------------------------------------------
def tokenize(text: str) -> list[str]:
    """Lower-cased words (letters and digits, inner apostrophes and hyphens kept): the analogy test set's form."""
    return WORD.findall(text.lower())


def read_sentences(paths: Sequence[str | Path]) -> list[list[str]]:
    """One sentence per non-blank line of each text file."""
    if not paths:
        raise UserError("no training text given; pass --data FILE [FILE ...]")
    sentences = []
    for path in paths:
        check_file(path, "word2vec training text")
        sentences += [words for line in read_text(path, "word2vec training text").splitlines()
                      if (words := tokenize(line))]
    return sentences


@dataclass
class Vocab:
    """Words with count >= min_count, most frequent first (ties in order of first appearance, as gensim)."""

    words: list[str]
    counts: list[int]

    def __post_init__(self) -> None:
        self.index = {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_count: int) -> Vocab:
        counts = Counter(word for sentence in sentences for word in sentence)
        kept = sorted(((w, c) for w, c in counts.items() if c >= min_count), key=lambda wc: -wc[1])
        if not kept:
            most = max(counts.values(), default=0)
            raise UserError(f"min_count={min_count} leaves an empty vocabulary (the most frequent word occurs {most} "
                            "times); lower --min_count or give more text")
        return cls([w for w, _ in kept], [c for _, c in kept])

    def keep_probabilities(self, sample: float) -> torch.Tensor:
        """The C tool's (and gensim's) subsampling: keep a word of count f with probability
        (sqrt(f / t) + 1) * t / f, capped at 1, where t = sample x (words in the vocabulary)."""
        counts = torch.tensor(self.counts, dtype=torch.float64)
        if sample == 0:
            return torch.ones(len(counts), dtype=torch.float32)
        threshold = sample * counts.sum()
        return ((torch.sqrt(counts / threshold) + 1) * threshold / counts).clamp(max=1.0).float()

    def noise_table(self, power: float = 0.75, size: int = 10_000_000) -> torch.Tensor:
        """The C tool's unigram table: word i fills a share of `size` slots proportional to count_i^0.75, so a
        uniform slot is a negative drawn from that distribution (one gather instead of a search per draw)."""
        weights = torch.tensor(self.counts, dtype=torch.float64) ** power
        edges = (weights.cumsum(0) / weights.sum() * size).round().long()
        starts = torch.cat([edges.new_zeros(1), edges[:-1]])
        return torch.repeat_interleave(torch.arange(len(weights), dtype=torch.int32), edges - starts).long()


def encode(sentences: Iterable[Sequence[str]], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, sentence number) of every in-vocabulary token in order; out-of-vocabulary words are dropped before
    windows are drawn, as in the C tool and gensim, so a window spans them."""
    ids, sentence_of = [], []
    for number, sentence in enumerate(sentences):
        row = [vocab.index[w] for w in sentence if w in vocab.index]
        ids += row
        sentence_of += [number] * len(row)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(sentence_of, dtype=torch.long)


# -- the objective -----------------------------------------------------------------------------------------------
def pair_scores(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """(P, 1+K) dot products v.u_k: inputs (P, d) are the input vectors (a word, or CBOW's context mean), outputs
    (P, 1+K, d) the positive output vector, then K negatives."""
    return torch.bmm(outputs, inputs.unsqueeze(2)).squeeze(2)


def negative_sampling_loss(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of -log s(v.u_0) - sum_k log s(-v.u_k) from pair_scores; valid (P, 1+K) drops a negative
    that happened to be the positive word."""
    signs = torch.full_like(scores, -1.0)
    signs[:, 0] = 1.0
    terms = -F.logsigmoid(signs * scores)
    if valid is not None:
        terms = terms * valid
    return terms.sum(1).mean()


def sgd_coefficients(scores: torch.Tensor, valid: torch.Tensor, lr: float) -> torch.Tensor:
    """lr x (label - sigmoid(v.u)) per (row, target): minus lr times the derivative of one row's loss with respect
    to the score, i.e. the C tool's `g`. The input row moves by sum_k g_k u_k, each output row by g_k v."""
    labels = torch.zeros_like(scores)
    labels[:, 0] = 1.0
    return (labels - torch.sigmoid(scores)) * valid * lr


# -- training -----------------------------------------------------------------------------------------------------
@dataclass
class TrainStats:
    words: int  # raw corpus words (before subsampling) times epochs: the throughput numerator gensim reports too
    seconds: float
    epoch_losses: list[float]

    @property
    def words_per_second(self) -> float:
        return self.words / max(self.seconds, 1e-9)


class Trainer:
    """The two tables (input vectors: the word vectors; output vectors: the negative-sampling weights) and the
    batched SGD over one corpus."""

    def __init__(self, vocab: Vocab, settings: Word2VecSettings) -> None:
        self.vocab, self.s = vocab, settings
        self.generator = torch.Generator().manual_seed(settings.seed)
        # gensim's init: input vectors uniform in [-0.5/dim, 0.5/dim), output vectors zero.
        self.w_in = (torch.rand(len(vocab), settings.dim, generator=self.generator) - 0.5) / settings.dim
        self.w_out = torch.zeros(len(vocab), settings.dim)
        self.keep = vocab.keep_probabilities(settings.sample)
        # All updates of a batch come from one snapshot, so a word repeated n times in it takes one step n times
        # as long. In a small vocabulary every word repeats in a large batch and SGD diverges: keep batches to
        # half the vocabulary, at least 64 centres (no limit at realistic sizes: 30k words allow 15k centres).
        self.batch = min(settings.batch_words, max(64, len(vocab) // 2))
        self.table = vocab.noise_table(size=min(10_000_000, 10_000 * len(vocab)))

    def train(self, ids: torch.Tensor, sentence_of: torch.Tensor,
              on_epoch: Callable[[int, float], None] | None = None) -> TrainStats:
        start, losses = time.perf_counter(), []
        total = self.s.epochs * len(ids)
        for epoch in range(self.s.epochs):
            kept = torch.rand(len(ids), generator=self.generator) < self.keep[ids]
            stream, sentences = ids[kept], sentence_of[kept]
            windows = self.s.window - torch.randint(0, self.s.window, (len(stream),), generator=self.generator)
            loss_sum, rows = 0.0, 0
            for begin in range(0, len(stream), self.batch):
                done = epoch * len(ids) + begin * len(ids) / max(len(stream), 1)
                lr = self.s.alpha - (self.s.alpha - self.s.min_alpha) * done / total
                centres = torch.arange(begin, min(begin + self.batch, len(stream)))
                batch_loss, batch_rows = self._step(stream, sentences, windows, centres, lr)
                loss_sum, rows = loss_sum + batch_loss * batch_rows, rows + batch_rows
            losses.append(loss_sum / max(rows, 1))
            if not math.isfinite(losses[-1]):
                raise UserError(f"word2vec diverged in epoch {epoch + 1} (loss {losses[-1]}); lower --alpha "
                                f"({self.s.alpha}) or --batch_words ({self.s.batch_words})")
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
        return TrainStats(total, time.perf_counter() - start, losses)

    def _step(self, stream: torch.Tensor, sentences: torch.Tensor, windows: torch.Tensor, centres: torch.Tensor,
              lr: float) -> tuple[float, int]:
        context, valid = context_positions(sentences, windows, centres, self.s.window)
        if self.s.arch == "skipgram":
            rows, cols = valid.nonzero(as_tuple=True)
            return self._skipgram(stream[context[rows, cols]], stream[centres[rows]], lr)
        keep = valid.any(1)
        return self._cbow(stream[context[keep]], valid[keep], stream[centres[keep]], lr)

    def _targets(self, positives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 1+K) output rows, the positive first, and which of them count (a negative equal to the positive
        is skipped, as in the C tool)."""
        draws = torch.randint(0, len(self.table), (len(positives), self.s.negative), generator=self.generator)
        negatives = self.table[draws]
        targets = torch.cat([positives[:, None], negatives], dim=1)
        valid = torch.ones(targets.shape)
        valid[:, 1:] = (negatives != positives[:, None]).float()
        return targets, valid

    def _skipgram(self, inputs: torch.Tensor, positives: torch.Tensor, lr: float) -> tuple[float, int]:
        if len(inputs) == 0:
            return 0.0, 0
        targets, valid = self._targets(positives)
        v = self.w_in.index_select(0, inputs)
        return self._update(v, targets, valid, lr, lambda error: self.w_in.index_add_(0, inputs, error)), len(inputs)

    def _cbow(self, context: torch.Tensor, valid: torch.Tensor, positives: torch.Tensor,
              lr: float) -> tuple[float, int]:
        if len(positives) == 0:
            return 0.0, 0
        targets, target_valid = self._targets(positives)
        rows, cols = valid.nonzero(as_tuple=True)
        words = context[rows, cols]
        h = torch.zeros(len(positives), self.s.dim).index_add_(0, rows, self.w_in.index_select(0, words))
        h /= valid.sum(1, keepdim=True)

        def spread(error: torch.Tensor) -> None:  # each context word takes the whole error (cbow_mean)
            self.w_in.index_add_(0, words, error.index_select(0, rows))

        return self._update(h, targets, target_valid, lr, spread), len(positives)

    def _update(self, v: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, lr: float,
                apply_input_error: Callable[[torch.Tensor], object]) -> float:
        """One SGD step from one snapshot: scores, the loss (for the log), then both tables' updates."""
        flat = targets.reshape(-1)
        u = self.w_out.index_select(0, flat).view(*targets.shape, self.s.dim)
        scores = pair_scores(v, u)
        loss = float(negative_sampling_loss(scores, valid))
        g = sgd_coefficients(scores, valid, lr)
        self.w_out.index_add_(0, flat, (g.unsqueeze(2) * v.unsqueeze(1)).view(-1, self.s.dim))
        apply_input_error(torch.bmm(g.unsqueeze(1), u).squeeze(1))
        return loss


def context_positions(sentences: torch.Tensor, windows: torch.Tensor, centres: torch.Tensor,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 2 x window) stream positions around each centre (-window..-1, 1..window) and which are real context:
    within the centre's drawn window and in its sentence."""
    offsets = torch.cat([torch.arange(-window, 0), torch.arange(1, window + 1)])
    positions = centres[:, None] + offsets[None, :]
    inside = (positions >= 0) & (positions < len(sentences))
    positions = positions.clamp(0, len(sentences) - 1)
    valid = inside & (offsets.abs()[None, :] <= windows[centres][:, None])
    valid &= sentences[positions] == sentences[centres][:, None]
    return positions, valid


# -- the vectors --------------------------------------------------------------------------------------------------
class WordVectors:
    """Words (most frequent first) and their vectors: neighbours, analogies, the word2vec text format."""

    def __init__(self, words: Sequence[str], vectors: torch.Tensor) -> None:
        if len(words) != len(vectors):
            raise ValueError(f"{len(words)} words but {len(vectors)} vectors")
        self.words = list(words)
        self.vectors = vectors.float()
        self.index = {word: i for i, word in enumerate(self.words)}
        self.unit = F.normalize(self.vectors, dim=1)

    def __len__(self) -> int:
        return len(self.words)

    def __getitem__(self, word: str) -> torch.Tensor:
        return self.vectors[self._id(word)]

    def _id(self, word: str) -> int:
        if word not in self.index:
            raise UserError(f"'{word}' is not in the vocabulary ({len(self)} words); check the spelling "
                            "(words are lower-cased) or lower --min_count")
        return self.index[word]

    def nearest(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The k words of highest cosine similarity to `word`, without the word itself."""
        row = self._id(word)
        sims = self.unit @ self.unit[row]
        sims[row] = float("-inf")
        return self._top(sims, k)

    def analogy(self, a: str, b: str, c: str, method: str = "add", k: int = 1) -> list[tuple[str, float]]:
        """a is to b as c is to ?: 3CosAdd argmax cos(x, b - a + c), or 3CosMul argmax cos'(x,b) cos'(x,c) /
        (cos'(x,a) + eps) with cos' = (cos + 1) / 2; the three question words are never answers."""
        scores = analogy_scores(self.unit, torch.tensor([[self._id(a), self._id(b), self._id(c)]]), method)[0]
        return self._top(scores, k)

    def _top(self, scores: torch.Tensor, k: int) -> list[tuple[str, float]]:
        best = scores.topk(min(k, len(self)))
        return [(self.words[i], v) for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)]

    def save_text(self, path: str | Path) -> None:
        """The word2vec text format: 'count dim', then 'word v1 ... vd' per line. Nine significant digits
        write a float32 exactly, so reading back gives the same vectors bit for bit."""
        lines = [f"{len(self)} {self.vectors.shape[1]}"]
        for word, row in zip(self.words, self.vectors.tolist(), strict=True):
            lines.append(word + " " + " ".join(f"{x:.9g}" for x in row))
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    @classmethod
    def load_text(cls, path: str | Path) -> WordVectors:
        lines = read_text(check_file(path, "word vectors file"), "word vectors file").splitlines()
        try:
            count, dim = (int(x) for x in lines[0].split())
            words, rows = [], []
            for line in lines[1:count + 1]:
                word, *values = line.rstrip().split(" ")
                if len(values) != dim:
                    raise ValueError(f"'{word}' has {len(values)} values")
                words.append(word)
                rows.append([float(v) for v in values])
        except (ValueError, IndexError) as exc:
            raise UserError(f"'{path}' is not in the word2vec text format ({exc}); write it with "
                            "`lmforge word2vec` or gensim's save_word2vec_format(binary=False)") from None
        if len(words) != count:
            raise UserError(f"'{path}' announces {count} words but holds {len(words)}; the file is truncated")
        return cls(words, torch.tensor(rows, dtype=torch.float32).reshape(count, dim))


def analogy_scores(unit: torch.Tensor, questions: torch.Tensor, method: str) -> torch.Tensor:
    """(Q, V) scores of every candidate for questions (Q, 3) of ids (a, b, c) over unit vectors; a, b, c -inf."""
    if method not in ("add", "mul"):
        raise UserError(f"analogy method '{method}' is not supported; choose add (3CosAdd) or mul (3CosMul)")
    cos_a, cos_b, cos_c = (unit[questions[:, i]] @ unit.T for i in range(3))
    if method == "add":
        scores = cos_b - cos_a + cos_c  # = |b - a + c| cos(x, b - a + c): the same argmax
    else:
        scores = (cos_b + 1) / 2 * (cos_c + 1) / 2 / ((cos_a + 1) / 2 + COSMUL_EPSILON)
    return scores.scatter(1, questions, float("-inf"))


@dataclass
class AnalogyResult:
    correct: dict[str, int]
    asked: dict[str, int]  # questions whose four words are all in the (restricted) vocabulary
    total: dict[str, int]

    def summary(self) -> dict[str, float]:
        """Accuracy (percent of covered questions) and coverage (percent of all) per part."""
        out = {}
        for part in ("semantic", "syntactic", "total"):
            out[f"{part}_accuracy"] = 100.0 * self.correct[part] / max(self.asked[part], 1)
            out[f"{part}_coverage"] = 100.0 * self.asked[part] / max(self.total[part], 1)
        return out


def read_analogies(path: str | Path) -> list[tuple[str, list[list[str]]]]:
    """(section name, [[a, b, c, d], ...]) per ': section' header of questions-words.txt, lower-cased."""
    sections: list[tuple[str, list[list[str]]]] = []
    for number, line in enumerate(read_text(check_file(path, "analogy file"), "analogy file").splitlines(), 1):
        if line.startswith(":"):
            sections.append((line[1:].strip(), []))
        elif line.strip():
            words = line.lower().split()
            if len(words) != 4 or not sections:
                raise UserError(f"{path}:{number}: expected ': section' or four words 'a b c d', got {line!r}")
            sections[-1][1].append(words)
    if not sections:
        raise UserError(f"'{path}' holds no analogy questions; expected questions-words.txt's format")
    return sections


def evaluate_analogies(vectors: WordVectors, path: str | Path, method: str = "add", restrict: int = 300_000,
                       batch: int = 512) -> AnalogyResult:
    """gensim's evaluate_word_analogies convention: only the `restrict` most frequent words are candidates and
    known; a question with any word outside them is skipped (it lowers coverage, not accuracy); the first five
    sections are semantic, the rest syntactic."""
    allowed = {w: i for i, w in enumerate(vectors.words[:restrict])}
    unit = vectors.unit[:restrict]
    result = AnalogyResult(*({p: 0 for p in ("semantic", "syntactic", "total")} for _ in range(3)))
    for number, (_, questions) in enumerate(read_analogies(path)):
        part = "semantic" if number < SEMANTIC_SECTIONS else "syntactic"
        known = [[allowed[w] for w in q] for q in questions if all(w in allowed for w in q)]
        correct = 0
        for start in range(0, len(known), batch):
            ids = torch.tensor(known[start:start + batch])
            correct += int((analogy_scores(unit, ids[:, :3], method).argmax(1) == ids[:, 3]).sum())
        for key in (part, "total"):
            result.correct[key] += correct
            result.asked[key] += len(known)
            result.total[key] += len(questions)
    return result


def train_word2vec(sentences: Sequence[Sequence[str]], settings: Word2VecSettings,
                   on_epoch: Callable[[int, float], None] | None = None) -> tuple[WordVectors, TrainStats]:
    """Vocabulary, then `settings.epochs` passes of SGD; the input table is the word vectors (as in gensim)."""
    vocab = Vocab.build(sentences, settings.min_count)
    ids, sentence_of = encode(sentences, vocab)
    trainer = Trainer(vocab, settings)
    stats = trainer.train(ids, sentence_of, on_epoch)
    return WordVectors(vocab.words, trainer.w_in), stats


def describe_speed(stats: TrainStats) -> str:
    return f"{stats.words:,} words in {stats.seconds:.1f} s ({stats.words_per_second:,.0f} words/s)"


__all__ = [
    "ARCHS", "AnalogyResult", "TrainStats", "Trainer", "Vocab", "Word2VecSettings", "WordVectors", "analogy_scores",
    "context_positions", "describe_speed", "encode", "evaluate_analogies", "negative_sampling_loss", "pair_scores",
    "read_analogies",
    "read_sentences", "sgd_coefficients", "tokenize", "train_word2vec",
]
