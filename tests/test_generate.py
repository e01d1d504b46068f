"""Decoding rules (top-k, top-p, temperature, seeds, stops) and KV-cached generation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import greedy_by_full_recompute, make_model
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, filter_logits, generate, generate_text, top_k_filter, top_p_filter
from lmforge.tokenizer import train_char

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(row=logit_rows, k=st.integers(1, 40))
def test_top_k_keeps_exactly_k_candidates(row, k):
    logits = torch.tensor(row) + torch.arange(len(row)) * 1e-3  # break ties
    kept = torch.isfinite(top_k_filter(logits, k))
    assert int(kept.sum()) == min(k, len(row))
    assert logits[kept].min() >= logits[~kept].max() if (~kept).any() else True


@settings(max_examples=80, deadline=None)
@given(row=logit_rows, p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_with_mass_at_least_p(row, p):
    logits = torch.tensor(row, dtype=torch.float64) + torch.arange(len(row)) * 1e-6
    probs = torch.softmax(logits, -1)
    kept = torch.isfinite(top_p_filter(logits, p))
    assert probs[kept].sum() >= p - 1e-9  # enough mass
    n = int(kept.sum())
    assert n == 1 or probs.sort(descending=True).values[: n - 1].sum() < p  # and no smaller set has it
    if (~kept).any():
        assert probs[kept].min() >= probs[~kept].max()  # and it is the most likely tokens


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    cold = torch.softmax(filter_logits(logits, temperature=0.5), -1)
    hot = torch.softmax(filter_logits(logits, temperature=2.0), -1)
    assert cold[0] > torch.softmax(logits, -1)[0] > hot[0]


def test_temperature_zero_and_tiny_temperature_equal_greedy():
    model = make_model("tiny-llama")
    prompt = [[3, 14, 15, 92]]
    greedy = generate(model, prompt, SamplingConfig(max_new_tokens=24, greedy=True))
    assert generate(model, prompt, SamplingConfig(max_new_tokens=24, temperature=0)) == greedy
    assert generate(model, prompt, SamplingConfig(max_new_tokens=24, temperature=1e-6, seed=1)) == greedy


def test_a_fixed_seed_reproduces_and_another_seed_differs():
    model = make_model("tiny")
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.5, top_p=0.95, seed=7)
    first = generate(model, [[1, 2, 3]], cfg)
    assert generate(model, [[1, 2, 3]], cfg) == first
    assert generate(model, [[1, 2, 3]], SamplingConfig(max_new_tokens=30, temperature=1.5, top_p=0.95, seed=8)) != first


def test_cached_greedy_decoding_equals_full_recompute_token_for_token(variant_model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13]]  # different lengths: left padding + masks
    got = generate(variant_model, prompts, SamplingConfig(max_new_tokens=16, greedy=True))
    assert got == [greedy_by_full_recompute(variant_model, prompt, 16) for prompt in prompts]


def test_top_k_one_sampling_is_greedy():
    model = make_model("tiny")
    greedy = generate(model, [[4, 5]], SamplingConfig(max_new_tokens=12, greedy=True))
    assert generate(model, [[4, 5]], SamplingConfig(max_new_tokens=12, top_k=1, seed=3)) == greedy


def test_eos_stops_a_row_and_streaming_sees_every_step():
    model = make_model("tiny")
    free = generate(model, [[1, 2]], SamplingConfig(max_new_tokens=10, greedy=True))[0]
    eos = free[3]
    seen = []
    stopped = generate(model, [[1, 2]], SamplingConfig(max_new_tokens=10, greedy=True), eos_id=eos,
                       on_token=lambda t: seen.append(int(t[0])))
    assert stopped[0] == free[: free.index(eos)]
    assert seen[: len(stopped[0]) + 1] == [*stopped[0], eos]


def test_stop_strings_cut_the_text_and_streaming_text_matches():
    text = "abcabcabc hello world\n" * 30
    tok = train_char([text])
    model = make_model("tiny", vocab_size=tok.vocab_size)
    free = generate_text(model, tok, "ab", SamplingConfig(max_new_tokens=30, greedy=True))[0]
    stop = free[5:7]
    pieces = []
    out = generate_text(model, tok, "ab", SamplingConfig(max_new_tokens=30, greedy=True, stop=[stop]),
                        on_text=lambda row, piece: pieces.append(piece))[0]
    assert out == free[: free.index(stop)]
    assert "".join(pieces) == out


def test_prompt_that_fills_the_context_is_a_clear_error():
    model = make_model("tiny", context_length=8)
    with pytest.raises(UserError, match="fills the model's context_length=8"):
        generate(model, [list(range(8))])


@pytest.mark.parametrize("bad,message", [
    (dict(top_p=0.0), r"^top_p=0\.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"^top_p=1\.5 must be in \(0, 1\]"),
    (dict(top_k=-1), r"^top_k=-1 must be >= 0"),
    (dict(temperature=-1), r"^temperature=-1 must be >= 0"),
    (dict(max_new_tokens=0), r"^max_new_tokens=0 must be >= 1"),
])
def test_bad_sampling_options_are_rejected(bad, message):
    with pytest.raises(UserError, match=message):
        SamplingConfig(**bad)
