"""word2vec: planted similarity is learned by both archs, the objective and its SGD step match a hand
computation and autograd, analogies by 3CosAdd / 3CosMul, the text format round-trips through gensim."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli
from lmforge.errors import UserError
from lmforge.recipes.word2vec import Word2VecConfig, Word2VecQueryConfig, run_word2vec, run_word2vec_query
from lmforge.word2vec import (
    Trainer,
    Vocab,
    Word2VecSettings,
    WordVectors,
    evaluate_analogies,
    negative_sampling_loss,
    pair_scores,
    sgd_coefficients,
    tokenize,
    train_word2vec,
)

TOPICS = 8


def planted_corpus(sentences: int = 1500, seed: int = 0) -> list[list[str]]:
    """Topic i has three context words and a planted pair (syn_i_a, syn_i_b) that occur interchangeably among
    them: the pair shares its contexts exactly, so each should be the other's nearest neighbour."""
    rng = random.Random(seed)
    fillers = [f"filler{j}" for j in range(10)]
    out = []
    for _ in range(sentences):
        i = rng.randrange(TOPICS)
        words = [f"ctx{i}w{j}" for j in range(3)] + [rng.choice((f"syn{i}a", f"syn{i}b"))]
        words += rng.sample(fillers, 2)
        rng.shuffle(words)
        out.append(words)
    return out


@pytest.mark.parametrize("arch", ["skipgram", "cbow"])
def test_planted_pairs_are_nearest(arch, one_thread):
    settings = Word2VecSettings(arch=arch, dim=24, window=3, min_count=1, sample=0, epochs=5, batch_words=64,
                                alpha=0.05 if arch == "cbow" else 0.025)
    vectors, stats = train_word2vec(planted_corpus(), settings)
    assert stats.epoch_losses[-1] < stats.epoch_losses[0]
    for i in range(TOPICS):
        assert vectors.nearest(f"syn{i}a", 1)[0][0] == f"syn{i}b"
        assert vectors.nearest(f"syn{i}b", 1)[0][0] == f"syn{i}a"


def test_negative_sampling_loss_by_hand():
    v = torch.tensor([[1.0, 0.0]])
    u = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # the positive, then two negatives
    scores = pair_scores(v, u)
    assert scores.tolist() == [[2.0, 0.0, -1.0]]
    by_hand = math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(-1))  # -log s(2) - log s(0) - log s(1)
    assert negative_sampling_loss(scores).item() == pytest.approx(by_hand, rel=1e-6)
    # A negative equal to the positive word is not counted.
    assert negative_sampling_loss(scores, torch.tensor([[1.0, 0.0, 1.0]])).item() == pytest.approx(
        by_hand - math.log(2), rel=1e-6)


def test_sgd_step_is_minus_lr_times_the_gradient():
    """One skip-gram pair: the hand-written update of both tables equals -lr x autograd's gradient of the loss."""
    vocab = Vocab(["w0", "w1", "w2", "w3"], [9, 5, 3, 2])
    trainer = Trainer(vocab, Word2VecSettings(dim=3, negative=2))
    torch.manual_seed(0)
    trainer.w_in, trainer.w_out = torch.randn(4, 3), torch.randn(4, 3)
    w_in, w_out = trainer.w_in.clone().requires_grad_(), trainer.w_out.clone().requires_grad_()
    inputs, targets, valid = torch.tensor([1]), torch.tensor([[2, 0, 3]]), torch.ones(1, 3)
    negative_sampling_loss(pair_scores(w_in[inputs], w_out[targets]), valid).backward()
    lr = 0.1
    trainer._update(trainer.w_in[inputs], targets, valid, lr, lambda e: trainer.w_in.index_add_(0, inputs, e))
    torch.testing.assert_close(trainer.w_in, (w_in - lr * w_in.grad).detach())
    torch.testing.assert_close(trainer.w_out, (w_out - lr * w_out.grad).detach())
    g = sgd_coefficients(pair_scores(w_in[inputs], w_out[targets]).detach(), valid, lr)
    assert g[0, 0] > 0 and (g[0, 1:] < 0).all()  # pulled towards the positive, pushed from the negatives


def test_subsampling_and_noise_follow_the_c_tool():
    vocab = Vocab(["the", "cat", "sat"], [1000, 10, 1])
    keep = vocab.keep_probabilities(1e-3)
    t = 1e-3 * 1011
    for kept, count in zip(keep.tolist(), (1000, 10, 1), strict=True):
        assert kept == pytest.approx(min(1.0, (math.sqrt(count / t) + 1) * t / count), rel=1e-5)
    assert keep[2].item() == 1.0 and keep[0].item() < 0.05
    table = vocab.noise_table(size=100_000)
    shares = torch.bincount(table, minlength=3).double() / len(table)
    expected = torch.tensor([1000, 10, 1], dtype=torch.float64) ** 0.75
    torch.testing.assert_close(shares, expected / expected.sum(), atol=1e-4, rtol=0)


def hand_made() -> WordVectors:
    """gender along axis 1, royalty along axis 2; 'apple' is unrelated."""
    words = ["man", "woman", "king", "queen", "prince", "apple"]
    vectors = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0],
                            [1.0, 0.1, 0.8], [0.2, -1.0, 0.0]])
    return WordVectors(words, vectors)


@pytest.mark.parametrize("method", ["add", "mul"])
def test_analogies_on_a_hand_made_embedding(method):
    vectors = hand_made()
    assert vectors.analogy("man", "king", "woman", method)[0][0] == "queen"
    assert vectors.analogy("king", "man", "queen", method)[0][0] == "woman"
    answers = [w for w, _ in vectors.analogy("man", "king", "woman", method, k=6)]
    assert not {"man", "king", "woman"} & set(answers[:3])  # question words are never answers


def test_3cosmul_by_hand():
    vectors = hand_made()
    unit = vectors.unit
    cos = {w: (unit @ unit[vectors.index[w]] + 1) / 2 for w in ("man", "king", "woman")}
    mul = cos["king"] * cos["woman"] / (cos["man"] + 1e-3)
    got = dict(vectors.analogy("man", "king", "woman", "mul", k=3))
    assert got["queen"] == pytest.approx(mul[vectors.index["queen"]].item(), rel=1e-6)


def test_analogy_evaluation_counts_like_gensim(tmp_path):
    """Five semantic sections, then syntactic; a question with an unknown word lowers coverage, not accuracy."""
    path = tmp_path / "questions.txt"
    sections = [": s1\nman king woman queen\n", ": s2\nMAN KING WOMAN QUEEN\nman king woman unknown\n", ": s3\n",
                ": s4\n", ": s5\nking man queen prince\n", ": gram1\nking man queen woman\n"]
    path.write_text("".join(sections))
    result = evaluate_analogies(hand_made(), path, "add")
    assert (result.correct, result.asked, result.total) == (
        {"semantic": 2, "syntactic": 1, "total": 3}, {"semantic": 3, "syntactic": 1, "total": 4},
        {"semantic": 4, "syntactic": 1, "total": 5})
    summary = result.summary()
    assert summary["semantic_accuracy"] == pytest.approx(200 / 3) and summary["total_coverage"] == 80.0
    # Restricted to the 3 most frequent words, no question is fully known.
    assert evaluate_analogies(hand_made(), path, "add", restrict=3).asked["total"] == 0
    # gensim scores the same vectors on the same file the same way
    from gensim.models import KeyedVectors

    hand_made().save_text(tmp_path / "v.txt")
    theirs = KeyedVectors.load_word2vec_format(str(tmp_path / "v.txt"))
    total, sections = theirs.evaluate_word_analogies(str(path))
    assert total == pytest.approx(3 / 4)
    assert [len(s["correct"]) for s in sections] == [1, 1, 0, 0, 0, 1, 3]  # the last is gensim's "Total accuracy"


def test_text_format_round_trips_through_gensim(tmp_path):
    from gensim.models import KeyedVectors

    vectors, _ = train_word2vec(planted_corpus(300), Word2VecSettings(dim=8, min_count=1, sample=0, epochs=1))
    path = tmp_path / "vectors.txt"
    vectors.save_text(path)
    theirs = KeyedVectors.load_word2vec_format(str(path), binary=False)
    assert theirs.index_to_key == vectors.words
    assert np.array_equal(theirs.vectors, vectors.vectors.numpy())  # nine digits write a float32 exactly
    ours = WordVectors.load_text(path)
    assert ours.words == vectors.words and torch.equal(ours.vectors, vectors.vectors)
    # and gensim's own file reads back the same way
    theirs.save_word2vec_format(str(tmp_path / "gensim.txt"), binary=False)
    again = WordVectors.load_text(tmp_path / "gensim.txt")
    assert again.words == vectors.words and torch.allclose(again.vectors, vectors.vectors, atol=1e-6)


def test_recipe_and_query(tmp_path, capsys, one_thread):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(s) for s in planted_corpus(1500)) + "\n")
    questions = tmp_path / "q.txt"
    questions.write_text(": family\nsyn0a ctx0w0 syn1a ctx1w0\n")
    out = tmp_path / "w2v"
    report = run_word2vec(Word2VecConfig(data=[str(corpus)], out_dir=str(out), dim=16, min_count=1, sample=0,
                                         epochs=3, window=3, analogies=str(questions)))
    assert report["vocabulary"] == TOPICS * 5 + 10 and len(report["epoch_losses"]) == 3
    assert set(report["analogies"]) == {"add", "mul"}
    assert "analogies 3CosAdd: semantic" in capsys.readouterr().out
    result = run_word2vec_query(Word2VecQueryConfig(vectors=str(out / "vectors.txt"), similar=["SYN3a"],
                                                    analogy=["syn0a ctx0w0 syn1a"], top_k=3))
    assert result["similar"]["SYN3a"][0][0] == "syn3b"
    assert len(result["analogy"]["syn0a ctx0w0 syn1a"]) == 3


def test_tokenize_keeps_inner_apostrophes_and_lowercases():
    assert tokenize("Don't STOP, well-known 42!") == ["don't", "stop", "well-known", "42"]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: Word2VecConfig(data=[str(tmp / "c.txt")], min_count=100, out_dir=str(tmp / "o")),
     "min_count=100 leaves an empty vocabulary (the most frequent word occurs 3 times)"),
    (lambda tmp: Word2VecConfig(data=[str(tmp / "c.txt")], arch="glove"),
     "arch='glove' is not supported; choose one of: skipgram, cbow"),
    (lambda tmp: Word2VecConfig(data=[str(tmp / "missing.txt")], out_dir=str(tmp / "o")),
     "does not exist; check the path"),
    (lambda tmp: Word2VecConfig(data=[], out_dir=str(tmp / "o")), "no training text given"),
    (lambda tmp: Word2VecConfig(data=[str(tmp / "c.txt")], window=0), "window=0 must be a positive integer"),
])
def test_bad_training_input(tmp_path, make, message, one_thread):
    (tmp_path / "c.txt").write_text("a b c\na b c\na b c\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_word2vec(make(tmp_path))
    assert not (tmp_path / "o").exists()


def test_bad_queries(tmp_path):
    path = tmp_path / "v.txt"
    hand_made().save_text(path)
    with pytest.raises(UserError, match="'duke' is not in the vocabulary"):
        run_word2vec_query(Word2VecQueryConfig(vectors=str(path), similar=["duke"]))
    with pytest.raises(UserError, match="needs three words"):
        run_word2vec_query(Word2VecQueryConfig(vectors=str(path), analogy=["man king"]))
    with pytest.raises(UserError, match="choose add"):
        run_word2vec_query(Word2VecQueryConfig(vectors=str(path), similar=["man"], method="sum"))
    path.write_text("3 2\nman 1 0\n")
    with pytest.raises(UserError, match="announces 3 words but holds 1"):
        run_word2vec_query(Word2VecQueryConfig(vectors=str(path), similar=["man"]))


def test_cli_trains_and_queries(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(s) for s in planted_corpus(1000)) + "\n")
    out = tmp_path / "w2v"
    done = run_cli("word2vec", "--data", str(corpus), "--arch", "cbow", "--dim", "16", "--min_count", "1",
                   "--sample", "0", "--epochs", "3", "--window", "3", "--alpha", "0.05", "--out_dir", str(out))
    assert done.returncode == 0, done.stderr
    assert "epoch 3/3: loss" in done.stdout and (out / "vectors.txt").is_file()
    done = run_cli("word2vec-query", "--vectors", str(out / "vectors.txt"), "--similar", "syn5b", "--top_k", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("syn5b: syn5a ")
    done = run_cli("word2vec", "--data", str(corpus), "--arch", "glove", "--out_dir", str(tmp_path / "o"))
    assert_one_line_error(done.stderr, "arch='glove' is not supported", done.returncode)
    assert not (tmp_path / "o").exists()
