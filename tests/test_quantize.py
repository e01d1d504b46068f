"""Post-training quantization: each format's round-trip error within its bound, forwards equal to the
de-quantized reference, exact bit packing, GPTQ below round-to-nearest on the same layer and data, quantized
state dicts that load into a fresh model, QLoRA over an already-quantized base, and clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_model, perturb
from lmforge.checkpoint import load_model_tensors, model_tensors
from lmforge.compress.gptq import collect_hessians, gptq_quantize_model, gptq_quantize_weight
from lmforge.compress.quant import (
    FORMATS,
    NF4_LEVELS,
    Int4Linear,
    NF4Linear,
    QuantizedEmbedding,
    QuantizedLinear,
    asymmetric_params,
    bytes_per_parameter,
    dequantize_asymmetric,
    dequantize_model,
    full_range_activations,
    pack_codes,
    quantize_asymmetric,
    quantize_model,
    restore_quantized_layers,
    unpack_codes,
)
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.generate import SamplingConfig, generate
from lmforge.models import model_class
from lmforge.peft import apply_method, describe, merge, with_method

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"int8": {}, "int8-dynamic": {}, "int4": {"group_size": 32}, "nf4": {}}


def weight_with_outlier(rows: int = 48, cols: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g) * 0.02
    weight[3, 5] = 0.5  # widens only its own row's / group's / block's scale
    weight[7] = 0.0  # an all-zero row must not divide by zero
    return weight


def linear_of(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.cfg.family == "seq2seq":
            return model(ids, decoder_input_ids=ids[:, :5]).logits
        return model(ids).logits


# -- bit packing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 7, 8, 9, 1001])
def test_pack_unpack_round_trips_exactly_and_densely(bits, length):
    codes = torch.randint(0, 2 ** bits, (length,), dtype=torch.uint8)
    codes[0] = 2 ** bits - 1  # the top code uses every bit
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (length * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, length), codes)


def test_three_bit_codes_take_three_bits():
    codes = torch.arange(8, dtype=torch.uint8)  # 0..7: code i at bits 3i..3i+2, little-endian
    packed = pack_codes(codes, 3)
    value = sum(int(b) << (8 * i) for i, b in enumerate(packed))
    assert packed.numel() == 3 and value == sum(i << (3 * i) for i in range(8))


# -- each format's error bound ---------------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step_of_its_row():
    weight = weight_with_outlier()
    module = FORMATS["int8"].from_linear(linear_of(weight))
    scale = weight.abs().amax(dim=1) / 127
    err = (module.dequantize() - weight).abs()
    assert module.weight_codes.dtype == torch.int8 and torch.allclose(module.weight_scale[scale > 0], scale[scale > 0])
    assert (err <= scale[:, None] / 2 + 1e-9).all()
    assert err[7].max() == 0  # the zero row is exact
    assert err[4].max() < err[3].max() / 5  # the outlier's row pays for it, the others don't


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [16, 96])  # 96 = the whole row: one group per row
def test_int4_error_is_at_most_half_a_step_of_its_group(bits, group_size):
    weight = weight_with_outlier()
    module = Int4Linear.from_linear(linear_of(weight), bits=bits, group_size=group_size)
    groups = weight.view(-1, group_size)
    scale = (groups.amax(dim=1).clamp(min=0) - groups.amin(dim=1).clamp(max=0)) / (2 ** bits - 1)
    err = (module.dequantize() - weight).abs().view(-1, group_size)
    assert torch.allclose(module.scales.flatten()[scale > 0], scale[scale > 0])
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert module.codes.numel() == (weight.numel() * bits + 7) // 8
    assert module.scales.shape == module.zeros.shape == (48, 96 // group_size)
    assert module.dequantize()[7].abs().max() == 0  # zero is representable exactly


def test_asymmetric_helpers_round_trip_their_own_levels():
    scale, zero = torch.tensor([0.5, 0.1]), torch.tensor([3.0, 0.0])
    codes = torch.randint(0, 16, (2, 10), dtype=torch.uint8)
    values = dequantize_asymmetric(codes, scale, zero)
    assert torch.equal(quantize_asymmetric(values, scale, zero, 4), codes)
    s, z = asymmetric_params(torch.tensor([[-1.0, 2.0], [0.5, 1.5]]), 4)
    assert torch.allclose(s, torch.tensor([0.2, 0.1])) and torch.equal(z, torch.tensor([5.0, 0.0]))


def test_nf4_error_is_within_half_the_widest_level_gap_times_the_block_absmax():
    weight = weight_with_outlier()
    module = NF4Linear.from_linear(linear_of(weight), block_size=64, double_quant=False)
    half_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)
    blocks = weight.view(-1, 64)
    err = (module.dequantize() - weight).abs().view(-1, 64)
    assert (err <= half_gap * blocks.abs().amax(dim=1)[:, None] + 1e-7).all()


def test_int8_embedding_gathers_rows_within_half_a_step():
    embedding = nn.Embedding(50, 24)
    module = QuantizedEmbedding.from_embedding(embedding)
    ids = torch.tensor([[0, 5, 49], [5, 5, 1]])
    scale = embedding.weight.detach().abs().amax(dim=1) / 127
    assert torch.equal(module(ids), F.embedding(ids, module.dequantize()))
    assert ((module.weight - embedding.weight).abs() <= scale[:, None] / 2 + 1e-9).all()
    assert module.storage_bytes() == 50 * 24 + 50 * 4


# -- forwards ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_weight_only_forward_equals_the_dequantized_linear(fmt):
    weight = weight_with_outlier()
    module = FORMATS[fmt].from_linear(linear_of(weight), **OPTIONS[fmt])
    x = torch.randn(3, 5, 96)
    with torch.no_grad():
        reference = F.linear(x, module.dequantize(), module.bias)
        assert (module(x) - reference).abs().max() <= 1e-5


def test_int8_dynamic_forward_is_within_the_activation_rounding_bound():
    torch.manual_seed(1)
    weight = weight_with_outlier()
    module = FORMATS["int8-dynamic"].from_linear(linear_of(weight))
    x = torch.randn(4, 96)
    with torch.no_grad():
        out = module(x)
        reference = F.linear(x, module.dequantize(), module.bias)
    assert module._packed is not None  # the int8 kernel ran (this CPU build has fbgemm/x86)
    # Activations: one per-tensor scale over [min(x, 0), max(x, 0)] (8 bits, or 7 without VNNI); each element
    # is off by at most half a step.
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / (255 if full_range_activations() else 127)
    bound = step / 2 * module.dequantize().abs().sum(dim=1)
    assert ((out - reference).abs() <= bound + 1e-5).all()
    assert (out - reference).abs().max() > 0  # it really quantized the activations


def test_int8_dynamic_does_not_saturate_on_the_largest_products():
    """Every activation at the top of its range against weights of one sign: the case where an int16 pair sum
    would overflow if 8-bit activations were used on a CPU without VNNI."""
    weight = torch.full((8, 256), 0.5)
    weight[1::2] = -0.5
    module = FORMATS["int8-dynamic"].from_linear(linear_of(weight, bias=False))
    x = torch.full((3, 256), 2.0)
    with torch.no_grad():
        assert torch.allclose(module(x), x @ weight.T, rtol=1e-3)


def test_int8_dynamic_falls_back_to_the_weight_only_path_when_the_input_needs_a_gradient():
    module = FORMATS["int8-dynamic"].from_linear(linear_of(weight_with_outlier()))
    x = torch.randn(2, 96, requires_grad=True)
    out = module(x)
    out.sum().backward()
    assert torch.allclose(out, F.linear(x, module.dequantize(), module.bias), atol=1e-5)
    assert torch.allclose(x.grad, module.dequantize().sum(dim=0).expand(2, -1), atol=1e-5)


def test_int8_dynamic_rebuilds_its_packed_weight_after_a_state_dict_load():
    a = FORMATS["int8-dynamic"].from_linear(linear_of(weight_with_outlier(seed=0)))
    b = FORMATS["int8-dynamic"].from_linear(linear_of(weight_with_outlier(seed=1)))
    x = torch.randn(2, 96)
    with torch.no_grad():
        before, expected = a(x), b(x)
        a.load_state_dict(b.state_dict())
        assert not torch.equal(before, expected) and torch.equal(a(x), expected)
    assert "_packed" not in "".join(a.state_dict())
    assert torch.equal(copy.deepcopy(a)(x), expected)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_empty_modules_have_the_exact_buffers_from_linear_gives(fmt):
    module = FORMATS[fmt].from_linear(nn.Linear(96, 40), **OPTIONS[fmt])
    specs = {k: (v.shape, v.dtype) for k, v in module.state_dict().items()}
    with torch.device("meta"):
        empty = FORMATS[fmt].empty(96, 40, True, **module.options())
    assert {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()} == specs
    assert all(v.is_meta for v in empty.state_dict().values())
    assert module.quantized_parameters == 96 * 40 and module.format == fmt


# -- whole models ---------------------------------------------------------------------------------------------


def fresh_model_like(model: nn.Module) -> nn.Module:
    """A meta model from the (saved) config, as loading a folder builds it."""
    cfg = ModelConfig.from_dict(model.cfg.to_dict())
    return model_class(cfg).for_loading(cfg)


def reload(model: nn.Module, layer_map: dict) -> nn.Module:
    tensors = model_tensors(model)
    fresh = restore_quantized_layers(fresh_model_like(model), layer_map)
    load_model_tensors(fresh, tensors, "test", assign=True)
    return fresh.eval()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_state_dict_loads_into_a_fresh_model(fmt):
    model = make_model("tiny-llama")
    perturb(model, seed=2)
    ids = torch.randint(0, 256, (2, 12))
    layer_map = quantize_model(model, fmt, **OPTIONS[fmt])
    assert set(layer_map) == {f"decoder.blocks.{i}.{n}" for i in range(2)
                              for n in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")}
    assert all(entry["format"] == fmt for entry in layer_map.values())
    loaded = reload(model, layer_map)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    greedy = SamplingConfig(greedy=True, max_new_tokens=4)  # generate runs under inference_mode, with a cache
    assert generate(loaded, [[5, 6, 7], [9]], greedy) == generate(model, [[5, 6, 7], [9]], greedy)


@pytest.mark.parametrize("include", ["head", "embeddings", "both"])
def test_a_tied_head_is_untied_never_quantized_through_its_embedding(include):
    model = make_model("tiny")  # GPT-2 style: lm_head shares embed.weight
    embed = model.embed.weight.detach().clone()
    ids = torch.randint(0, 256, (2, 12))
    reference = logits(model, ids)
    layer_map = quantize_model(model, "int4", group_size=32, include_head=include in ("head", "both"),
                               include_embeddings=include in ("embeddings", "both"))
    assert layer_map["lm_head"]["untied"] is True and model.cfg.tie_embeddings is False
    tensors = model_tensors(model)
    if include == "head":
        assert torch.equal(tensors["embed.weight"], embed)  # the embedding is saved as it was, in fp32
        assert isinstance(model.lm_head, Int4Linear) and "lm_head.codes" in tensors
    if include == "embeddings":
        assert torch.equal(tensors["lm_head.weight"], embed)  # the head keeps the full-precision table
        assert isinstance(model.embed, QuantizedEmbedding) and layer_map["lm_head"]["format"] is None
    loaded = reload(model, layer_map)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    relative = (logits(model, ids) - reference).norm() / reference.norm()
    assert 0 < relative < 0.25  # 4-bit weights: near the float model, not equal
    out = generate(loaded, [[5, 6, 7]], SamplingConfig(greedy=True, max_new_tokens=3))  # reads embed.weight
    assert len(out[0]) == 3


@pytest.mark.parametrize("preset", ["tiny-bert", "tiny-t5"])
def test_every_family_quantizes_its_blocks_including_cross_attention(preset):
    model = build(preset)
    ids = torch.randint(0, 256, (2, 10))
    layer_map = quantize_model(model, "int8")
    if preset == "tiny-t5":
        assert "decoder.blocks.0.cross_attn.kv" in layer_map and "encoder.blocks.1.mlp.down" in layer_map
    assert not any(isinstance(model.get_submodule(n), QuantizedLinear) for n in ("lm_head",))
    assert isinstance(model.embed, nn.Embedding)
    loaded = reload(model, layer_map)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def build(preset: str) -> nn.Module:
    """A model of any family (conftest's make_model builds causal ones)."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    return model_class(cfg)(cfg).eval()


def test_bytes_per_parameter_and_counts_follow_each_format():
    expected = {"int8": 1 + 4 / 64, "int4": 0.5 + 5 / 32, "nf4": (0.5, 0.52)}
    for fmt, value in expected.items():
        model = make_model("tiny-llama")  # every block linear reads 64 or 128 features
        count = describe(model).total
        quantize_model(model, fmt, **OPTIONS[fmt])
        assert describe(model).total == count  # quantized weights still count as parameters
        measured = bytes_per_parameter(model)
        if isinstance(value, tuple):
            assert value[0] < measured < value[1]
        elif fmt == "int8":
            assert 1 < measured <= value
        else:
            assert measured == pytest.approx(value)


def test_dequantize_model_gives_plain_modules_with_the_same_outputs():
    model = make_model("tiny")
    ids = torch.randint(0, 256, (2, 12))
    quantize_model(model, "int4", group_size=16, include_embeddings=True, include_head=True)
    quantized = logits(model, ids)
    dequantize_model(model)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    assert (logits(model, ids) - quantized).abs().max() <= 1e-5


# -- GPTQ -----------------------------------------------------------------------------------------------------


def correlated_inputs(n: int = 1024, width: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated, unevenly scaled features, as real activations are (what GPTQ exploits)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width ** 0.5 + 0.3 * torch.eye(width)
    return torch.randn(n, width, generator=g) @ mix * (torch.rand(width, generator=g) * 3)


def reconstruction_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return float((x @ (weight - quantized).T).norm())


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_reconstructs_a_layer_better_than_round_to_nearest(bits, act_order):
    x = correlated_inputs()
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.1
    hessian = 2 * x.T @ x / x.shape[0]
    codes, scales, zeros = gptq_quantize_weight(weight, hessian, bits, 32, 0.01, act_order, 128)
    gptq = Int4Linear(128, 48, Int4Linear.buffers(codes, scales, zeros, bits), None, bits=bits, group_size=32)
    rtn = Int4Linear.from_linear(linear_of(weight, bias=False), bits=bits, group_size=32)
    assert reconstruction_error(x, weight, gptq.dequantize()) < 0.85 * reconstruction_error(x, weight, rtn.dequantize())
    # Lazy batches only defer updates: the block size changes nothing but rounding.
    other = gptq_quantize_weight(weight, hessian, bits, 32, 0.01, act_order, 16)[0]
    assert (other != codes).float().mean() < 1e-3


def test_gptq_zeroes_dead_inputs_and_stays_finite():
    x = correlated_inputs(width=64)
    x[:, 10] = 0  # an input that is never active
    weight = torch.randn(16, 64)
    codes, scales, zeros = gptq_quantize_weight(weight, 2 * x.T @ x / x.shape[0], 4, 64, 0.01, True, 32)
    module = Int4Linear(64, 16, Int4Linear.buffers(codes, scales, zeros, 4), None, bits=4, group_size=64)
    assert torch.isfinite(module.dequantize()).all()
    assert module.dequantize()[:, 10].abs().max() <= scales.max() / 2 + 1e-7


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_model_beats_rtn_on_the_first_blocks_calibration_inputs(bits):
    model = make_model("tiny-llama")
    perturb(model, seed=3)
    calibration = torch.randint(0, 256, (16, 32))
    first = "decoder.blocks.0.mlp.up"
    x_hessian = collect_hessians(model, calibration, {first: model.get_submodule(first)})[first]
    weight = model.get_submodule(first).weight.detach().clone()
    rtn = Int4Linear.from_linear(model.get_submodule(first), bits=bits, group_size=32)
    layer_map = gptq_quantize_model(model, calibration, bits=bits, group_size=32, block_size=32)
    assert set(layer_map) == set(quantize_model(make_model("tiny-llama"), "int8"))
    assert all(entry == {"format": "int4", "bits": bits, "group_size": 32} for entry in layer_map.values())

    def error(quantized: torch.Tensor) -> float:  # ‖(W − Ŵ) X‖² = tr(ΔW H ΔWᵀ) / 2 · n, from the Hessian
        delta = weight - quantized
        return float((delta @ x_hessian * delta).sum())

    assert error(model.get_submodule(first).dequantize()) < error(rtn.dequantize())
    ids = torch.randint(0, 256, (2, 12))
    assert torch.equal(logits(reload(model, layer_map), ids), logits(model, ids))


def test_gptq_handles_a_masked_model_and_refuses_seq2seq():
    model = build("tiny-bert")
    layer_map = gptq_quantize_model(model, torch.randint(0, 256, (4, 16)), bits=4, group_size=64)
    assert all(isinstance(model.get_submodule(n), Int4Linear) for n in layer_map)
    with pytest.raises(UserError, match="seq2seq; use --method int4"):
        gptq_quantize_model(build("tiny-t5"), torch.randint(0, 256, (4, 16)))
    with pytest.raises(UserError, match="already quantized"):
        gptq_quantize_model(model, torch.randint(0, 256, (4, 16)))


def test_gptq_include_head_unties_a_tied_head():
    model = make_model("tiny")
    embed = model.embed.weight.detach().clone()
    layer_map = gptq_quantize_model(model, torch.randint(0, 256, (4, 16)), group_size=64, include_head=True)
    assert layer_map["lm_head"] == {"format": "int4", "bits": 4, "group_size": 64, "untied": True}
    assert torch.equal(model.embed.weight, embed) and model.cfg.tie_embeddings is False


# -- QLoRA over a quantized base --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8-dynamic"])
def test_qlora_keeps_a_pre_quantized_base_as_it_is(fmt):
    model = make_model("tiny-llama")
    quantize_model(model, fmt, **OPTIONS[fmt])
    before = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with_method(model, "qlora", {"targets": "all", "r": 4})
    after = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)  # no re-quantizing
    assert all(hasattr(m, "lora") for m in after.values())
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in buffers.items())


def lora_losses(model: nn.Module, method: str, steps: int = 30) -> list[float]:
    torch.manual_seed(5)  # the same LoRA initialisation for every base
    apply_method(model, method, targets="all", r=4)
    ids = torch.randint(0, 256, (8, 17), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_lora_on_an_int4_base_trains_like_lora_on_its_dequantized_weights_and_merges():
    model = make_model("tiny-llama")
    quantize_model(model, "int4", bits=4, group_size=32)
    plain = dequantize_model(copy.deepcopy(model))
    losses = lora_losses(model, "qlora")
    assert losses[-1] < losses[0] - 0.5  # 5.56 → ~4.7 on random tokens in 30 steps
    assert losses == pytest.approx(lora_losses(plain, "lora"), abs=1e-3)  # gradients flow through the int4 base
    model.eval()
    ids = torch.randint(0, 256, (2, 12))
    before = logits(model, ids)
    merged = merge(model)
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())
    assert (logits(merged, ids) - before).abs().max() <= 1e-4


# -- errors ------------------------------------------------------------------------------------------------------


def test_an_unknown_method_lists_the_valid_ones():
    with pytest.raises(UserError, match="'int3' is unknown; choose one of: int8, int8-dynamic, int4, nf4"):
        quantize_model(make_model(), "int3")


def test_a_group_size_that_does_not_divide_the_width_names_it_and_the_fix():
    model = make_model()
    with pytest.raises(UserError, match=r"group_size=48 does not divide the layer width 64; choose a divisor"):
        quantize_model(model, "int4", group_size=48)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing changed half-way
    with pytest.raises(UserError, match="group_size=48"):
        gptq_quantize_model(model, torch.randint(0, 256, (2, 8)), group_size=48)


def test_quantizing_an_already_quantized_model_is_refused():
    model = make_model()
    quantize_model(model, "int8")
    with pytest.raises(UserError, match=r"already quantized \(int8\); quantize the original"):
        quantize_model(model, "int4")


def test_unknown_or_bad_options_are_named():
    with pytest.raises(UserError, match=r"'int8' has no option\(s\) \['group_size'\]"):
        quantize_model(make_model(), "int8", group_size=32)
    with pytest.raises(UserError, match="bits=9"):
        quantize_model(make_model(), "int4", bits=9, group_size=32)
