"""Parameter-efficient fine-tuning: each method trains only its own tensors, starts where it should,
merges exactly, survives save/load, works with the KV cache; NF4 keeps its error bound."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import greedy_by_full_recompute, make_model, perturb
from lmforge.checkpoint import model_tensors
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.models import build_model
from lmforge.peft import (
    NF4_LEVELS,
    QuantizedLinear,
    add_lora,
    apply_method,
    bytes_per_parameter,
    dequantize_model,
    describe,
    freeze,
    load_method_state,
    lora_sites,
    measure_peak_memory,
    merge,
    merge_lora,
    nf4_dequantize,
    nf4_quantize,
    quantize_model,
    save_method_state,
    unmerge_lora,
)
from lmforge.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = {
    "lora": dict(targets="all", r=4),
    "qlora": dict(targets=["q", "v", "down"], r=4),
    "prompt": dict(n_tokens=4),
    "prefix": dict(n_tokens=3),
    "prefix-mlp": dict(n_tokens=3, hidden=16),
    "adapter": dict(bottleneck=8),
    "bitfit": {},
    "selective": dict(patterns="decoder.blocks.1.mlp,lm_head"),
}


def method_model(name: str, preset: str = "tiny", **overrides) -> nn.Module:
    model = make_model(preset, **overrides)
    return apply_method(model, name.removesuffix("-mlp"), **METHODS[name])


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_lora_parameter_count_of_a_512x64_weight_is_86_percent_fewer():
    linear = nn.Linear(64, 512, bias=False)  # weight 512×64
    freeze(linear)
    add_lora(linear, "w", 0, 512, r=8, alpha=16)
    count = describe(linear)
    assert (count.trainable, count.base, count.total) == (512 * 8 + 8 * 64, 32768, 32768 + 4608)
    assert count.trainable == 4608 and round(100 * count.reduction) == 86


def test_describe_counts_lora_on_q_and_v_of_a_gqa_model():
    model = apply_method(make_model("tiny-llama"), "lora", targets="q,v", r=8)
    d, q_rows, kv_rows, layers = 64, 4 * 16, 2 * 16, 2
    expected = layers * ((8 * d + q_rows * 8) + (8 * d + kv_rows * 8))
    count = describe(model)
    assert count.trainable == expected and count.base == make_model("tiny-llama").num_parameters()
    assert count.percent == pytest.approx(100 * expected / (count.base + expected))


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])
def test_lora_starts_at_the_base_and_merged_equals_unmerged(preset, tmp_path):
    base = make_model(preset)
    ids = torch.randint(0, 256, (2, 16))
    model = apply_method(copy.deepcopy(base), "lora", targets="all", r=4, dropout=0.1)
    model.eval()
    assert torch.equal(logits(model, ids), logits(base, ids))  # B = 0: exactly the base
    perturb(model, seed=1, trainable_only=True)
    unmerged = logits(model, ids)
    assert (unmerged - logits(base, ids)).abs().max() > 1e-3
    merge_lora(model, unload=False)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    unmerge_lora(model)
    assert (logits(model, ids) - unmerged).abs().max() <= 1e-5
    plain = merge(model)  # folds and removes the updates: a plain model again
    assert not any("lora" in name for name in plain.state_dict())
    assert set(model_tensors(plain)) == set(model_tensors(base))
    assert (logits(plain, ids) - unmerged).abs().max() <= 1e-5


def test_lora_on_q_and_gate_changes_only_those_rows_of_the_fused_linears():
    base = make_model("tiny-llama")
    model = apply_method(copy.deepcopy(base), "lora", targets=["q", "gate"], r=2)
    perturb(model, seed=1, trainable_only=True)
    merge(model)
    q_rows, hidden = 64, base.cfg.hidden_size
    for name, changed in (("attn.qkv", slice(0, q_rows)), ("mlp.up", slice(0, hidden))):
        before = base.get_submodule(f"decoder.blocks.0.{name}").weight
        after = model.get_submodule(f"decoder.blocks.0.{name}").weight
        assert not torch.equal(before[changed], after[changed])
        assert torch.equal(before[changed.stop:], after[changed.stop:])  # k, v (or up) rows untouched


def per_update_reference(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The LoRA definition written out: the base output plus each update's scaled B A x in its own rows."""
    y = torch.nn.functional.linear(x, linear.weight, linear.bias)
    pieces, done = [], 0
    for u in sorted(linear.lora.values(), key=lambda u: u.start):
        pieces += [y[..., done:u.start], y[..., u.start:u.stop] + u(x)]
        done = u.stop
    return torch.cat([*pieces, y[..., done:]], dim=-1)


@pytest.mark.parametrize("trainable_base", [False, True])
def test_fused_lora_rows_match_the_per_update_definition_in_value_and_gradient(trainable_base):
    # q and v of a fused qkv (k's rows left out, a gap), with their own ranks and alphas.
    linear = nn.Linear(16, 40, bias=True).requires_grad_(trainable_base)
    add_lora(linear, "v", 28, 40, r=3, alpha=6)
    add_lora(linear, "q", 0, 16, r=2, alpha=8, rslora=True)
    perturb(linear.lora, seed=3, trainable_only=True)  # B away from zero, so every rank column matters
    x = torch.randn(3, 5, 16, requires_grad=True)
    params = [x, *linear.lora.parameters(), *([linear.weight, linear.bias] if trainable_base else [])]

    got = linear(x)
    expected = per_update_reference(linear, x)
    assert (got - expected).abs().max() <= 1e-5
    weights = torch.randn_like(expected)
    grads = torch.autograd.grad((got * weights).sum(), params)
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    for g, e in zip(grads, expected_grads, strict=True):
        assert (g - e).abs().max() <= 1e-5 * max(1.0, e.abs().max().item())
    assert torch.equal(got[..., 16:28], torch.nn.functional.linear(x, linear.weight, linear.bias)[..., 16:28])


def test_fused_lora_gradients_pass_gradcheck_in_double_precision():
    linear = nn.Linear(6, 10, dtype=torch.float64).requires_grad_(False)
    add_lora(linear, "gate", 0, 5, r=2, alpha=4)
    add_lora(linear, "up", 5, 10, r=1, alpha=3)
    perturb(linear.lora, seed=1, trainable_only=True)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: linear(x), (x, *linear.lora.parameters()))


def test_lora_dropout_draws_one_mask_per_update_in_training_and_none_in_eval():
    linear = nn.Linear(8, 12).requires_grad_(False)
    for target, start in (("q", 0), ("k", 4), ("v", 8)):
        add_lora(linear, target, start, start + 4, r=2, alpha=4, dropout=0.5)
    perturb(linear.lora, seed=1, trainable_only=True)
    x = torch.randn(2, 7, 8)
    torch.manual_seed(5)
    got = linear(x)
    torch.manual_seed(5)  # the reference calls each update in row order, as the fused path draws masks
    expected = per_update_reference(linear, x)
    assert (got - expected).abs().max() <= 1e-5
    linear.eval()
    plain = per_update_reference(linear, x)
    assert (got - plain).abs().max() > 1e-3  # dropout was on in training ...
    assert (linear(x) - plain).abs().max() <= 1e-5  # ... and is off in eval


@pytest.mark.parametrize("name", sorted(METHODS))
def test_only_the_method_parameters_train_and_the_base_stays_bit_identical(name):
    model = method_model(name, vocab_size=64, context_length=32)
    before = {k: v.clone() for k, v in model_tensors(model).items()}  # a tied head once
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(dict(model.named_parameters()))
    ids = torch.randint(0, 64, (4, 12))
    model.train()
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    model.zero_grad(set_to_none=True)
    train(model, lambda i: {"input_ids": ids[:, :-1], "labels": ids[:, 1:]},
          TrainConfig(steps=3, lr=1e-2, warmup_steps=0, weight_decay=0.1, progress=False))
    after = model_tensors(model)
    frozen = [k for k in before if k not in trainable]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trainable)


@pytest.mark.parametrize("preset,method", [("tiny-t5", "lora"), ("tiny-t5", "prompt"), ("tiny-t5", "prefix"),
                                           ("tiny-t5", "adapter"), ("tiny-bert", "prompt"), ("tiny-bert", "prefix")])
def test_methods_fit_encoders_and_encoder_decoders(preset, method):
    torch.manual_seed(0)
    base = build_model(ModelConfig.from_preset(preset)).eval()
    model = apply_method(copy.deepcopy(base), method, **METHODS[method])
    perturb(model, seed=1, trainable_only=True)
    ids, mask = torch.randint(0, 256, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    kwargs = dict(attention_mask=mask, labels=ids) if preset == "tiny-t5" else dict(attention_mask=mask)
    out, ref = model(ids, **kwargs), base(ids, **kwargs)
    assert out.logits.shape == ref.logits.shape and not torch.allclose(out.logits, ref.logits)
    (out.loss if out.loss is not None else out.logits.square().mean()).backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    if preset == "tiny-t5":
        outputs = generate(model, [[5, 6, 7], [8]], SamplingConfig(greedy=True, max_new_tokens=4))
        assert all(len(o) == 4 for o in outputs)


# -- NF4 -------------------------------------------------------------------------------------------


def _half_widest_gap() -> float:
    return float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_is_within_half_the_widest_level_gap_per_block(double_quant):
    torch.manual_seed(0)
    weight = torch.randn(96, 70) * 0.02  # 6720 values: the last block is padded
    weight[3, 5] = 0.5  # an outlier only widens its own block's scale
    q = nf4_quantize(weight, 64, double_quant)
    back = nf4_dequantize(q, weight.shape, 64)
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == 105 * 32  # two codes a byte
    flat = torch.nn.functional.pad(weight.flatten(), (0, 105 * 64 - weight.numel())).view(-1, 64)
    err = torch.nn.functional.pad((back - weight).abs().flatten(), (0, 105 * 64 - weight.numel())).view(-1, 64)
    absmax = flat.abs().amax(dim=1)
    bound = _half_widest_gap() * absmax
    if double_quant:  # the scales are themselves approximate: add their error, |x/absmax| <= 1 times it
        scales = nf4_dequantize({**q, "codes": torch.full_like(q["codes"], 0xFF)}, (105 * 64,), 64).view(-1, 64)[:, 0]
        bound = bound + (scales - absmax).abs() * 1.0001
        assert (scales - absmax).abs().max() <= 0.07 * (absmax - absmax.mean()).abs().max()  # FP8: 3 mantissa bits
    assert (err.amax(dim=1) <= bound + 1e-7).all()
    assert err[35:].max() < err.max()  # small blocks keep small errors


def test_nf4_levels_themselves_round_trip_exactly():
    codes = torch.randint(0, 16, (4, 64))
    scale = torch.tensor([1.0, 0.5, 2.0, 0.25])[:, None]
    weight = NF4_LEVELS[codes] * scale
    weight[:, 0] = NF4_LEVELS[15] * scale[:, 0]  # each block's absmax is its scale
    assert torch.equal(nf4_dequantize(nf4_quantize(weight, 64, False), weight.shape, 64), weight)


def test_qlora_forward_matches_the_dequantized_model_and_stores_half_a_byte_per_weight():
    base = make_model("tiny-llama")
    ids = torch.randint(0, 256, (2, 16))
    model = apply_method(copy.deepcopy(base), "qlora", targets="all", r=4)
    assert all(isinstance(model.get_submodule(f"decoder.blocks.0.{n}"), QuantizedLinear)
               for n in ("attn.qkv", "attn.out", "mlp.up", "mlp.down"))
    assert 0.5 < bytes_per_parameter(model) < 0.52  # 4-bit codes + double-quantized scales
    fp32_scales = copy.deepcopy(base)
    quantize_model(fp32_scales, "nf4", double_quant=False)
    assert bytes_per_parameter(fp32_scales) == pytest.approx(0.5625)
    dequantized = dequantize_model(copy.deepcopy(model))  # the LoRA hooks follow nothing: B is zero anyway
    assert (logits(model, ids) - logits(dequantized, ids)).abs().max() <= 1e-5
    relative = (logits(model, ids) - logits(base, ids)).norm() / logits(base, ids).norm()
    assert relative.item() < 0.1  # 4-bit weights: close to the float model, not equal
    perturb(model, seed=1, trainable_only=True)
    merged = merge(copy.deepcopy(model))  # de-quantize, then fold the updates in
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    assert (logits(model, ids) - logits(merged, ids)).abs().max() <= 1e-4


# -- KV cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prefix", "prefix-mlp", "prompt"])
def test_cached_generation_equals_full_recompute(name):
    model = method_model(name, "tiny-llama").eval()
    perturb(model, seed=1, trainable_only=True)
    prompts = [[5, 9, 13, 2, 77], [31, 8]]  # different lengths: generate left-pads the second
    cached = generate(model, prompts, SamplingConfig(greedy=True, max_new_tokens=8))
    assert cached == [greedy_by_full_recompute(model, p, 8) for p in prompts]
    ids = torch.tensor([prompts[0]])
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(ids[:, :4], cache=cache)
        step = model(ids[:, 4:], cache=cache).logits[:, -1]
    assert (step - logits(model, ids)[:, -1]).abs().max() <= 1e-5
    extra = model.decoder.prompt.length if name == "prompt" else 0
    assert cache.length == 5 + extra  # prefixes are not cached and take no positions



def test_a_soft_prompt_takes_context_positions_from_generation():
    model = apply_method(make_model("tiny", context_length=16), "prompt", n_tokens=4).eval()
    assert model.token_room == 12
    outputs = generate(model, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]], SamplingConfig(greedy=True, max_new_tokens=8))
    assert len(outputs[0]) == 2  # 10 prompt tokens + 4 virtual leave 2 of the 16 learned positions
    with pytest.raises(UserError, match="less 4 virtual tokens"):
        generate(model, [list(range(5, 17))], SamplingConfig(greedy=True, max_new_tokens=1))

# -- saving -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_state_round_trips_with_only_the_trained_tensors(name, tmp_path):
    model = method_model(name).eval()
    perturb(model, seed=1, trainable_only=True)
    save_method_state(tmp_path / "state", model)
    fresh = load_method_state(make_model("tiny"), tmp_path / "state").eval()
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(logits(fresh, ids), logits(model, ids))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "state" / "method.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_user_mistakes_name_the_value_and_the_fix():
    cases = [
        (lambda: apply_method(make_model(), "loraa"), "method 'loraa' is unknown"),
        (lambda: apply_method(make_model(), "lora", rank=4), r"no option\(s\) \['rank'\]"),
        (lambda: apply_method(make_model(), "lora", targets="q,w"), "lora target 'w' is unknown"),
        (lambda: apply_method(make_model(), "lora", targets="gate"), "'gate' matches no projection"),
        (lambda: apply_method(make_model(), "lora", targets="q,qkv"), "both adapt rows"),
        (lambda: apply_method(make_model(), "lora", r=0), "r=0 must be a positive"),
        (lambda: apply_method(make_model("tiny-llama"), "bitfit"), "no bias parameters"),
        (lambda: apply_method(apply_method(make_model(), "bitfit"), "lora"), "already has method 'bitfit'"),
        (lambda: merge(apply_method(make_model(), "prompt")), "cannot be folded"),
        (lambda: apply_method(make_model(), "prompt", n_tokens=64), "n_tokens=64 must be between"),
        (lambda: apply_method(make_model(), "selective", patterns="decoder.blocks.9"), "matches no parameter"),
        (lambda: merge_lora(apply_method(make_model(), "qlora"), unload=False), "unload=True"),
    ]
    for call, message in cases:
        with pytest.raises(UserError, match=message):
            call()


def test_lora_sites_name_every_projection_of_a_seq2seq_block():
    model = build_model(ModelConfig.from_preset("tiny-t5"))
    keys = {k.split(".", 3)[-1] for k in lora_sites(model) if k.startswith("decoder.blocks.0.")}
    assert keys == {"q", "k", "v", "qkv", "o", "up", "down", "cross_q", "cross_k", "cross_v", "cross_kv", "cross_o"}


def _current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the resident size from Linux's /proc")
def test_peak_memory_is_measured_around_a_step():
    model = method_model("lora")
    ids = torch.randint(0, 256, (4, 32))
    buffer_bytes = 200 * 2**20

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        buffer = torch.ones(buffer_bytes // 4)  # float32, every page written: resident while the step runs
        assert float(buffer[-1]) == 1.0
        del buffer
        return loss.item()

    before = _current_rss()
    loss, peak = measure_peak_memory(step)
    assert loss > 0 and peak.source in ("rss", "rss-lifetime")
    assert peak.bytes >= before + 0.95 * buffer_bytes, (peak.bytes / 2**20, before / 2**20)
