"""Attention against the written-out reference, causality, padding and the KV cache."""

import pytest
import torch

from conftest import make_model
from lmforge.config import ModelConfig
from lmforge.nn import Attention, KVCache, reference_attention


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_sdpa_attention_equals_reference_attention(kv_heads):
    cfg = ModelConfig.from_preset("tiny", n_kv_heads=kv_heads)
    attn = Attention(cfg).eval()
    x = torch.randn(3, 10, cfg.d_model)
    q, k, v = attn.qkv(x).split([4 * 16, kv_heads * 16, kv_heads * 16], dim=-1)
    q = q.view(3, 10, 4, 16).transpose(1, 2)
    k = k.view(3, 10, kv_heads, 16).transpose(1, 2).repeat_interleave(4 // kv_heads, dim=1)
    v = v.view(3, 10, kv_heads, 16).transpose(1, 2).repeat_interleave(4 // kv_heads, dim=1)
    expected = attn.out(reference_attention(q, k, v).transpose(1, 2).reshape(3, 10, 64))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_reference_attention_with_padding_mask_ignores_masked_keys():
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    mask = torch.tensor([True, True, True, False, False]).view(1, 1, 1, 5)
    full = reference_attention(q, k, v, mask=mask, causal=False)
    trimmed = reference_attention(q, k[:, :, :3], v[:, :, :3], causal=False)
    torch.testing.assert_close(full, trimmed)


def test_changing_a_future_token_never_changes_earlier_logits(variant_model):
    ids = torch.randint(0, variant_model.cfg.vocab_size, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(0, variant_model.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        a, b = variant_model(ids).logits, variant_model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_cached_incremental_forward_equals_full_forward(variant_model):
    ids = torch.randint(0, variant_model.cfg.vocab_size, (2, 20))
    with torch.no_grad():
        full = variant_model(ids).logits
        cache = variant_model.new_cache(2, 20)
        steps = [variant_model(ids[:, :7], cache=cache).logits, variant_model(ids[:, 7:12], cache=cache).logits]
        steps += [variant_model(ids[:, t:t + 1], cache=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_left_padding_does_not_change_real_tokens_logits(variant_model):
    short = torch.randint(1, variant_model.cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), short], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 6])
    with torch.no_grad():
        alone = variant_model(short).logits
        with_pad = variant_model(padded, attention_mask=mask).logits[:, 4:]
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-4)


def test_kv_cache_refuses_to_overflow():
    cache = KVCache(ModelConfig.from_preset("tiny"), batch=1, max_len=4, device="cpu")
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(0, torch.zeros(1, 4, 5, 16), torch.zeros(1, 4, 5, 16))


def test_sequence_longer_than_context_is_refused():
    model = make_model("tiny", context_length=8)
    with pytest.raises(ValueError, match="exceeds the model's context_length=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
