from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data import MaskedWindows, SpanCorruptionBatches, mask_tokens, span_corruption
from lmforge.data.objectives import IGNORE_INDEX, MASK_RATE, MASK_TOKEN_SHARE, RANDOM_TOKEN_SHARE, reconstruct
from lmforge.errors import UserError

MASK_ID = 4
SENTINELS = list(range(3199, 2999, -1))  # T5's layout: <extra_id_0> has the highest id
EOS, PAD = 1, 0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _is_window_of(stream: np.ndarray, row: list[int] | np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(stream, len(row))
    return bool(np.all(windows == np.asarray(row), axis=1).any())


# -- masked LM -------------------------------------------------------------------------------------
def test_mask_tokens_follows_berts_rates_and_shares():
    ids = torch.randint(10, 20, (64, 512), generator=_gen(0))
    maskable = torch.rand(64, 512, generator=_gen(1)) < 0.9  # the rest stand for specials and padding
    random_ids = torch.arange(10, 20)
    inputs, labels = mask_tokens(ids, maskable, MASK_ID, random_ids, generator=_gen(2))
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~maskable).any()
    assert (labels[chosen] == ids[chosen]).all() and (labels[~chosen] == IGNORE_INDEX).all()
    assert (inputs[~chosen] == ids[~chosen]).all()
    assert abs(chosen.sum() / maskable.sum() - MASK_RATE) < 0.01
    masked = (inputs[chosen] == MASK_ID).float().mean()
    # "Unchanged" also catches the random draws that happen to equal the original id.
    unchanged = (inputs[chosen] == ids[chosen]).float().mean()
    random = 1 - masked - unchanged
    keep_share = 1 - MASK_TOKEN_SHARE - RANDOM_TOKEN_SHARE
    assert abs(masked - MASK_TOKEN_SHARE) < 0.02
    assert abs(unchanged - (keep_share + RANDOM_TOKEN_SHARE / len(random_ids))) < 0.02
    assert abs(random - RANDOM_TOKEN_SHARE * (1 - 1 / len(random_ids))) < 0.02
    assert torch.isin(inputs[chosen & (inputs != MASK_ID)], random_ids).all()


def test_every_row_with_a_maskable_token_has_a_label():
    ids = torch.randint(10, 100, (50, 20), generator=_gen(0))
    maskable = torch.zeros(50, 20, dtype=torch.bool)
    positions = torch.randint(0, 20, (49,), generator=_gen(1))
    maskable[torch.arange(1, 50), positions] = True  # row 0 has nothing maskable (all padding)
    _, labels = mask_tokens(ids, maskable, MASK_ID, torch.arange(10, 100), rate=0.001, generator=_gen(2))
    chosen = labels != IGNORE_INDEX
    assert not chosen[0].any()
    assert (chosen[1:] == maskable[1:]).all()  # the only maskable position is forced in


def test_mask_tokens_is_deterministic_for_a_seed():
    ids = torch.randint(10, 100, (4, 64), generator=_gen(0))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    first = mask_tokens(ids, maskable, MASK_ID, torch.arange(10, 100), generator=_gen(7))
    again = mask_tokens(ids, maskable, MASK_ID, torch.arange(10, 100), generator=_gen(7))
    other = mask_tokens(ids, maskable, MASK_ID, torch.arange(10, 100), generator=_gen(8))
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert not (first[1] == other[1]).all()


def _stream(n: int = 5000) -> np.ndarray:
    tokens = np.random.default_rng(0).integers(10, 200, n).astype(np.uint16)
    tokens[::13] = EOS  # document separators
    return tokens


def test_masked_windows_never_mask_specials_and_are_a_function_of_the_index():
    tokens = _stream()
    windows = MaskedWindows(tokens, 8, 64, 3, MASK_ID, np.arange(10, 200), special_ids=[0, 1, 2, 3, 4])
    batch = windows(5)
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 64)
    chosen = batch["labels"] != IGNORE_INDEX
    original = torch.where(chosen, batch["labels"], batch["input_ids"])
    assert all(_is_window_of(tokens, row) for row in original.numpy())
    separators = original == EOS
    assert separators.any() and not (chosen & separators).any()
    assert (batch["input_ids"][separators] == EOS).all()
    assert chosen.any(dim=1).all()
    again = MaskedWindows(tokens, 8, 64, 3, MASK_ID, np.arange(10, 200), special_ids=[0, 1, 2, 3, 4])(5)
    assert all((again[k] == batch[k]).all() for k in batch)
    assert not (windows(6)["input_ids"] == batch["input_ids"]).all()


def test_masking_errors_are_clear():
    ids, maskable = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(UserError, match="rate=0"):
        mask_tokens(ids, maskable, MASK_ID, torch.arange(10), rate=0)
    with pytest.raises(UserError, match="random_ids is empty"):
        mask_tokens(ids, maskable, MASK_ID, torch.arange(0))
    with pytest.raises(UserError, match=r"maskable has shape \(2, 3\)"):
        mask_tokens(ids, maskable[:, :3], MASK_ID, torch.arange(10))
    with pytest.raises(UserError, match="fewer than context_length=64"):
        MaskedWindows(np.arange(10, dtype=np.uint16), 2, 64, 0, MASK_ID, [5, 6], [0])


# -- span corruption -------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 300), density=st.floats(0.05, 0.5), mean=st.floats(1.0, 5.0), seed=st.integers(0, 2**32))
def test_span_corruption_round_trips_and_numbers_sentinels_in_order(length, density, mean, seed):
    ids = list(range(1000, 1000 + length))
    inputs, targets = span_corruption(ids, SENTINELS, density, mean, rng=np.random.default_rng(seed))
    assert reconstruct(inputs, targets, SENTINELS) == ids
    in_sentinels = [t for t in inputs if t in SENTINELS]
    spans = len(in_sentinels)
    assert in_sentinels == SENTINELS[:spans]
    assert [t for t in targets if t in SENTINELS] == SENTINELS[:spans + 1]
    assert inputs[0] not in SENTINELS and inputs[-1] == SENTINELS[spans - 1]  # kept span first, noise span last
    assert targets[0] == SENTINELS[0] and targets[-1] == SENTINELS[spans]
    for seq in (inputs, targets):  # every span is non-empty: sentinels are never adjacent
        assert not any(a in SENTINELS and b in SENTINELS for a, b in pairwise(seq))
    noise = len(targets) - spans - 1
    assert noise == min(max(round(length * density), 1), length - 1)
    assert len(inputs) == length - noise + spans


def test_span_corruption_hits_the_density_and_mean_span_length():
    ids = np.arange(1000, 2000)
    lengths = []
    for seed in range(20):
        inputs, targets = span_corruption(ids, SENTINELS, 0.15, 3.0, rng=np.random.default_rng(seed))
        spans = sum(t in SENTINELS for t in inputs)
        assert spans == 50 and len(targets) - spans - 1 == 150  # 15% of 1000 in spans of 3 on average
        cuts = [i for i, t in enumerate(targets) if t in SENTINELS]
        lengths += [b - a - 1 for a, b in pairwise(cuts)]
    assert np.mean(lengths) == 3.0 and len(set(lengths)) > 3  # span lengths vary
    first = span_corruption(ids, SENTINELS, rng=np.random.default_rng(0))
    assert first == span_corruption(ids, SENTINELS, rng=np.random.default_rng(0))
    assert first != span_corruption(ids, SENTINELS, rng=np.random.default_rng(1))


def test_span_corruption_matches_t5s_example_layout():
    inputs, targets = span_corruption([11, 12, 13, 14, 15, 16, 17, 18, 19], [100, 101, 102], 0.3, 2.0,
                                      rng=np.random.default_rng(0))
    assert inputs.count(100) == inputs.count(101) == 1 and 102 not in inputs  # 3 noise tokens in 2 spans
    assert targets[0] == 100 and targets[-1] == 102 and len(targets) == 3 + 3


def test_span_corruption_errors_are_clear():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="at least 2 tokens, got 1"):
        span_corruption([5], SENTINELS, rng=rng)
    with pytest.raises(UserError, match="needing 51 sentinels but only 10"):
        span_corruption(range(1000), SENTINELS[:10], rng=rng)
    with pytest.raises(UserError, match="noise_density=1"):
        span_corruption(range(10), SENTINELS, noise_density=1, rng=rng)
    with pytest.raises(UserError, match=r"mean_span_length=0\.5"):
        span_corruption(range(10), SENTINELS, mean_span_length=0.5, rng=rng)
    with pytest.raises(UserError, match="not a sentinel"):
        reconstruct([1, 2], [7, 8], SENTINELS)


# -- span-corruption batches -----------------------------------------------------------------------
def _span_batches(input_length: int = 64, batch_size: int = 8, **options) -> SpanCorruptionBatches:
    tokens = np.random.default_rng(0).integers(10, 1000, 20_000).astype(np.uint16)
    return SpanCorruptionBatches(tokens, batch_size, input_length, 3, SENTINELS, EOS, PAD, **options)


def test_span_corruption_batches_have_fixed_shapes_eos_and_masks():
    batches = _span_batches()
    batch = batches(4)
    inputs, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert inputs.shape == mask.shape == (8, 64) and labels.shape == (8, batches.target_length)
    for row_inputs, row_mask, row_labels in zip(inputs.tolist(), mask.tolist(), labels.tolist(), strict=True):
        n = sum(row_mask)
        assert row_mask == [1] * n + [0] * (64 - n) and all(t == PAD for t in row_inputs[n:])
        assert row_inputs[n - 1] == EOS and EOS not in row_inputs[:n - 1]
        targets = [t for t in row_labels if t != IGNORE_INDEX]
        assert targets[-1] == EOS and row_labels[:len(targets)] == targets
        window = reconstruct(row_inputs[:n - 1], targets[:-1], SENTINELS)
        assert len(window) == batches.raw_length and _is_window_of(batches.tokens, window)
    assert (mask == 1).all() and (labels != IGNORE_INDEX).all()  # 64 tokens fill up exactly here


def test_span_corruption_batches_are_a_function_of_the_index():
    batch = _span_batches()(4)
    again = _span_batches()(4)
    assert all((again[k] == batch[k]).all() for k in batch)
    assert not (_span_batches()(5)["input_ids"] == batch["input_ids"]).all()


@pytest.mark.parametrize("density", [0.05, 0.15, 0.3, 0.5])
def test_raw_windows_are_the_longest_whose_inputs_fit(density):
    for input_length in [3, 4, 5, 7, 10, 16, 33, 64, 100, 127, 512]:
        batches = _span_batches(input_length, batch_size=2, noise_density=density)
        batch = batches(0)
        assert batch["input_ids"].shape == (2, input_length)
        assert batch["attention_mask"].sum(dim=1).max() <= input_length
        longer, _ = span_corruption(range(batches.raw_length + 1), SENTINELS, density, rng=np.random.default_rng(0))
        assert len(longer) + 1 > input_length  # one more raw token would not fit
    assert _span_batches(512).raw_length == 568 and _span_batches(512).target_length == 115  # T5's 568 -> 512/114


def test_span_corruption_batch_errors_are_clear():
    with pytest.raises(UserError, match="input_length=2 is too short"):
        _span_batches(2)
    with pytest.raises(UserError, match="needing 29 sentinels but only 10"):
        SpanCorruptionBatches(np.arange(1000, dtype=np.uint16), 2, 512, 0, SENTINELS[:10], EOS, PAD)
    with pytest.raises(UserError, match="fewer than raw_length=70"):
        SpanCorruptionBatches(np.arange(50, dtype=np.uint16), 2, 64, 0, SENTINELS, EOS, PAD, split="validation")
