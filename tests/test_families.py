"""Encoder-only and encoder-decoder models: bidirectionality, padding invariance, the cross-attention
cache, save/load, and tiny models that learn MLM, classification, tagging and reversal."""

import pytest
import torch

from lmforge.checkpoint import load
from lmforge.config import ModelConfig
from lmforge.data.objectives import mask_tokens
from lmforge.generate import SamplingConfig, generate
from lmforge.models import (
    IGNORE_INDEX,
    CausalLM,
    Encoder,
    MaskedLM,
    Seq2SeqLM,
    SequenceClassifier,
    TokenClassifier,
    build_model,
)
from lmforge.train import TrainConfig, batch_loss, mlm_loss, save_checkpoint, train

ENCODERS = {
    "bert-like": dict(preset="tiny-bert"),
    "prenorm-rope-rmsnorm": dict(preset="tiny-bert", norm_placement="pre", positions="rope", norm="rmsnorm",
                                 embed_norm=False, mlp="swiglu", type_vocab_size=0),
    "t5-relative": dict(preset="tiny-bert", positions="relative", norm_placement="pre", scale_attention=False),
}
SEQ2SEQ = {
    "t5-v1.0": dict(preset="tiny-t5"),
    "t5-v1.1-gated-untied": dict(preset="tiny-t5", mlp="geglu", tie_embeddings=False, logits_scale=1.0,
                                 n_decoder_layers=3, n_kv_heads=2),
    "original-sinusoidal-postnorm": dict(preset="tiny-t5", positions="sinusoidal", norm_placement="post",
                                         norm="layernorm", scale_attention=True, logits_scale=1.0),
}


def build(spec: dict, seed: int = 0, **overrides) -> torch.nn.Module:
    spec = {**spec, **overrides}
    torch.manual_seed(seed)
    return build_model(ModelConfig.from_preset(spec.pop("preset"), **spec)).eval()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_padding_never_changes_real_token_outputs(name):
    model = build(ENCODERS[name])
    ids = torch.randint(5, 256, (2, 10))
    plain = model(ids).hidden
    padded_ids = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], dim=1).long()
    padded = model(padded_ids, attention_mask=mask).hidden
    torch.testing.assert_close(padded[:, :10], plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_encoder_attends_both_ways(name):
    model = build(ENCODERS[name])
    ids = torch.randint(5, 256, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 256
    assert not torch.allclose(model(ids).hidden[0, 0], model(changed).hidden[0, 0])


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_cached_decoding_equals_full_recompute(name):
    model = build(SEQ2SEQ[name])
    src = torch.randint(3, 256, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    target = torch.randint(3, 256, (2, 7))
    memory = model.encode(src, mask)
    full = model.decode(target, memory, mask)
    cache = model.new_cache(2, 7)
    steps = [model.decode(target[:, :3], memory, mask, cache)]  # a multi-token first chunk, then one at a time
    steps += [model.decode(target[:, t:t + 1], memory, mask, cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert set(cache.cross) == set(range(model.cfg.decoder_layers))  # cross k/v computed once per layer


@pytest.mark.parametrize("name", sorted(SEQ2SEQ))
def test_source_padding_never_changes_decoder_logits(name):
    model = build(SEQ2SEQ[name])
    src, target = torch.randint(3, 256, (1, 8)), torch.randint(3, 256, (1, 5))
    plain = model(src, decoder_input_ids=target).logits
    padded = model(torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], 1),
                   attention_mask=torch.tensor([[1] * 8 + [0] * 4]), decoder_input_ids=target).logits
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_argmax_of_full_decoding():
    model = build(SEQ2SEQ["t5-v1.0"])
    src = [[5, 6, 7, 8, 1], [9, 10, 1]]
    out = generate(model, src, SamplingConfig(greedy=True, max_new_tokens=6, stop_at_eos=False))
    for row, tokens in zip(src, out, strict=True):
        decoder = [model.cfg.decoder_start_id, *tokens[:-1]]
        logits = model(torch.tensor([row]), decoder_input_ids=torch.tensor([decoder])).logits[0]
        assert logits.argmax(-1).tolist() == tokens


@pytest.mark.parametrize("cls,spec", [
    (MaskedLM, dict(preset="tiny-bert")),
    (Encoder, dict(preset="tiny-bert", head="none")),
    (SequenceClassifier, dict(preset="tiny-bert", head="sequence", num_labels=3, labels=["a", "b", "c"])),
    (TokenClassifier, dict(preset="tiny-bert", head="token", num_labels=5, pooling="mean")),
    (Seq2SeqLM, dict(preset="tiny-t5")),
    (Seq2SeqLM, SEQ2SEQ["t5-v1.1-gated-untied"]),
])
def test_save_then_load_gives_identical_outputs(tmp_path, cls, spec):
    model = build(spec)
    assert type(model) is cls
    ids = torch.randint(3, 256, (2, 10))
    kwargs = {"decoder_input_ids": ids[:, :4]} if cls is Seq2SeqLM else {}
    save_checkpoint(tmp_path / "ckpt", model)
    again, _ = load(tmp_path / "ckpt")
    assert type(again) is cls and again.cfg == model.cfg
    before, after = model(ids, **kwargs), again(ids, **kwargs)
    for name in ("logits", "hidden"):
        if getattr(before, name) is not None:
            assert torch.equal(getattr(before, name), getattr(after, name)), name


def test_heads_other_than_lm_need_the_masked_family():
    from lmforge.errors import UserError
    with pytest.raises(UserError, match="needs model\\.family"):
        ModelConfig.from_preset("tiny", head="token", num_labels=2)
    with pytest.raises(UserError, match="needs model\\.family"):
        ModelConfig.from_preset("tiny-t5", head="sequence", num_labels=2)
    assert ModelConfig.from_preset("tiny", head="sequence", num_labels=1).head == "sequence"  # a reward model
    with pytest.raises(UserError, match="num_labels >= 1"):
        ModelConfig.from_preset("tiny-bert", head="sequence")


# -- tiny models that learn ------------------------------------------------------------------------
MASK, FIRST_SYMBOL, N_SYMBOLS, LENGTH = 1, 4, 16, 16


def progression_batch(index: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Arithmetic progressions mod 16 with stride 1 or 2: a masked token follows from its neighbours."""
    g = torch.Generator().manual_seed(index)
    start = torch.randint(0, N_SYMBOLS, (batch_size, 1), generator=g)
    stride = torch.randint(1, 3, (batch_size, 1), generator=g)
    ids = FIRST_SYMBOL + (start + stride * torch.arange(LENGTH)) % N_SYMBOLS
    random_ids = torch.arange(FIRST_SYMBOL, FIRST_SYMBOL + N_SYMBOLS)
    inputs, labels = mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), MASK, random_ids, generator=g)
    return {"input_ids": inputs, "labels": labels}


def test_tiny_encoder_learns_a_masked_lm_task():
    model = build(dict(preset="tiny-bert"), vocab_size=FIRST_SYMBOL + N_SYMBOLS, context_length=LENGTH)
    train(model, progression_batch, TrainConfig(steps=400, lr=3e-3, warmup_steps=20, weight_decay=0.0,
                                                 progress=False), loss_fn=mlm_loss)
    held_out = progression_batch(10_000_000, batch_size=512)
    with torch.no_grad():
        loss = model(**held_out).loss.item()
    assert loss < 0.9, f"held-out MLM loss {loss:.3f} (chance: ln 16 = 2.77)"


def classify_batch(index: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Label 1 iff symbol 4 occurs more often than symbol 5 — it needs the whole sequence."""
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + 4, (batch_size, 12), generator=g)
    labels = ((ids == 4).sum(1) > (ids == 5).sum(1)).long()
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_tiny_classifier_learns_a_separable_task(pooling):
    model = build(dict(preset="tiny-bert"), vocab_size=16, head="sequence", num_labels=2, pooling=pooling)
    train(model, classify_batch, TrainConfig(steps=250, lr=3e-3, warmup_steps=20, weight_decay=0.0,
                                             progress=False), loss_fn=batch_loss)
    held_out = classify_batch(10_000_000, batch_size=1000)
    with torch.no_grad():
        accuracy = (model(held_out["input_ids"]).logits.argmax(-1) == held_out["labels"]).float().mean()
    assert accuracy > 0.95


def test_tiny_token_classifier_learns_to_tag():
    def batch(index: int) -> dict[str, torch.Tensor]:  # tag = whether the token equals its left neighbour
        ids = torch.randint(4, 7, (64, 12), generator=torch.Generator().manual_seed(index))
        tags = torch.cat([torch.zeros(64, 1, dtype=torch.long), (ids[:, 1:] == ids[:, :-1]).long()], dim=1)
        return {"input_ids": ids, "labels": tags}

    model = build(dict(preset="tiny-bert"), vocab_size=8, head="token", num_labels=2)
    train(model, batch, TrainConfig(steps=400, lr=3e-3, warmup_steps=20, progress=False), loss_fn=batch_loss)
    held_out = batch(10_000_000)
    with torch.no_grad():
        accuracy = (model(held_out["input_ids"]).logits.argmax(-1) == held_out["labels"]).float().mean()
    assert accuracy > 0.98


EOS, START = 1, 0


def reverse_batch(index: int, batch_size: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(index)
    x = torch.randint(3, 3 + 12, (batch_size, 6), generator=g)
    eos = torch.full((batch_size, 1), EOS)
    return {"input_ids": torch.cat([x, eos], 1), "labels": torch.cat([x.flip(1), eos], 1)}


def test_tiny_seq2seq_learns_to_reverse_sequences():
    model = build(dict(preset="tiny-t5"), vocab_size=16, context_length=16)
    train(model, reverse_batch, TrainConfig(steps=400, lr=3e-3, warmup_steps=20, weight_decay=0.0,
                                            progress=False), loss_fn=batch_loss)
    held_out = reverse_batch(10_000_000, batch_size=200)
    out = generate(model, held_out["input_ids"].tolist(), SamplingConfig(greedy=True, max_new_tokens=8), eos_id=EOS)
    expected = held_out["labels"][:, :-1].tolist()
    exact = sum(o == e for o, e in zip(out, expected, strict=True)) / len(expected)
    assert exact >= 0.95, f"exact match {exact:.2%}"


def test_causal_model_is_still_the_default_family():
    assert type(build(dict(preset="tiny"))) is CausalLM
    assert IGNORE_INDEX == -100
