"""`lmforge.generate.fill_mask` against a hand computation: softmax over the vocabulary at each [MASK], top-k."""

import math

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import fill_mask
from lmforge.models import build_model
from lmforge.tokenizer import train_char, train_wordpiece

TEXT = "a funny film and a dull mess , the best movie of the year"


@pytest.fixture(scope="module")
def masked():
    tokenizer = train_wordpiece([TEXT] * 5, vocab_size=120, min_frequency=1)
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("tiny-bert", vocab_size=tokenizer.vocab_size)).eval()
    return model, tokenizer


def by_hand(model, tokenizer, text, k):
    """Each [MASK]'s k best (token, probability), computed without torch.softmax or topk."""
    ids = tokenizer.encode_for_encoder(text, model.token_room)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().tolist()
    guesses = []
    for position, token in enumerate(ids):
        if token != tokenizer.mask_id:
            continue
        row = logits[position]
        top = max(row)
        weights = [math.exp(x - top) for x in row]
        total = sum(weights)
        ranked = sorted(range(len(row)), key=lambda i: -weights[i])[:k]
        guesses.append([(tokenizer.decode([i]), weights[i] / total) for i in ranked])
    return guesses


@pytest.mark.parametrize(("text", "k"), [("a [MASK] film", 3), ("a [MASK] film and [MASK] dull [MASK]", 5)])
def test_fill_mask_is_the_softmax_top_k_at_each_mask(masked, text, k):
    model, tokenizer = masked
    fills = fill_mask(model, tokenizer, text, top_k=k)
    expected = by_hand(model, tokenizer, text, k)
    assert len(fills) == text.count("[MASK]") == len(expected)
    for got, want in zip(fills, expected, strict=True):
        assert [token for token, _ in got] == [token for token, _ in want]
        assert [p for _, p in got] == pytest.approx([p for _, p in want], rel=1e-5)
        assert [p for _, p in got] == sorted((p for _, p in got), reverse=True)
    assert fills[0] != fills[-1] or len(fills) == 1  # different positions, different guesses


def test_fill_mask_needs_a_mask_in_the_text_and_in_the_tokenizer(masked):
    model, tokenizer = masked
    with pytest.raises(UserError, match=r"the text has no \[MASK\] to fill"):
        fill_mask(model, tokenizer, "no mask here")
    with pytest.raises(UserError, match="this tokenizer has no mask token"):
        fill_mask(model, train_char([TEXT]), "a [MASK] film")
