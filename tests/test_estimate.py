import json

import pytest
import torch
from torch import nn

from conftest import VARIANTS, assert_one_line_error, make_model, run_cli
from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import UserError
from lmforge.estimate import (
    ModelMemory,
    activation_bytes,
    block_parameters,
    chinchilla_loss,
    chinchilla_optimum,
    chinchilla_rule,
    compute_optimal_tokens,
    count_parameters,
    flops_per_token,
    gpu_days,
    kv_cache_bytes,
    lmforge_sharding,
    lora_parameters,
    matmul_parameters,
    model_memory,
    per_device_memory,
    petaflop_s_days,
    training_flops,
    training_memory_bytes,
)
from lmforge.models import build_model
from lmforge.nn import KVCache
from lmforge.peft import apply_method
from lmforge.recipes.estimate import EstimateConfig, estimate_report, run_estimate


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matmul_parameters_count_every_linear_weight_once(name):
    spec = dict(VARIANTS[name])
    model = make_model(spec.pop("preset"), **spec)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_parameters(model.cfg) == linear_weights


def test_parameter_count_equals_the_built_model_for_every_preset_and_head(monkeypatch):
    monkeypatch.setattr(nn.init, "normal_", lambda tensor, *args, **kwargs: tensor)  # slow on meta, values unused
    configs = [ModelConfig.from_preset(name) for name in sorted(PRESETS)] + [
        ModelConfig.from_preset("tiny", **over) for over in (
            dict(family="masked", head="sequence", num_labels=3), dict(family="masked", head="none"),
            dict(family="masked", head="token", num_labels=5, pooling="mean"),
            dict(qkv_bias=True, attention_bias=False, tie_embeddings=False),
            dict(family="seq2seq", positions="learned", n_decoder_layers=3, mlp="swiglu"),
            dict(n_kv_heads=1, d_head=8, norm="rmsnorm", norm_bias=False, mlp_bias=False))]
    for cfg in configs:
        with torch.device("meta"):  # a 8B model costs nothing here
            model = build_model(cfg)
        assert count_parameters(cfg) == sum(p.numel() for p in model.parameters()), cfg


def test_gpt2_124m_and_llama2_7b_by_hand():
    v, ctx, d, layers = 50257, 1024, 768, 12
    # embeddings + positions + blocks (qkv, out, 4d MLP with biases; two LayerNorms) + final LayerNorm
    gpt2 = v * d + ctx * d + layers * (12 * d * d + 13 * d) + 2 * d
    assert gpt2 == count_parameters(ModelConfig.from_preset("gpt2")) == 124_439_808
    v, d, layers, ffn = 32000, 4096, 32, 11008
    # untied embeddings and head + blocks (q, k, v, o; SwiGLU gate/up/down; two RMSNorms) + final RMSNorm
    llama = 2 * v * d + layers * (4 * d * d + 3 * d * ffn + 2 * d) + d
    assert llama == count_parameters(ModelConfig.from_preset("llama2-7b")) == 6_738_415_616


@pytest.mark.parametrize("preset,targets", [("tiny", ["q", "v"]), ("tiny-llama", ["all"]),
                                            ("tiny-t5", ["all"]), ("tiny-t5", ["qkv", "cross_kv", "down"])])
def test_lora_parameters_equal_what_apply_lora_adds(preset, targets):
    model = apply_method(make_model(preset) if preset != "tiny-t5" else build_model(ModelConfig.from_preset(preset)),
                         "lora", r=4, targets=targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_parameters(model.cfg, 4, targets) == trainable


def saved_activation_bytes(model, batch):
    """Bytes of the distinct tensors autograd saves for backward in one forward (weights and buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return sum(seen.values())


@pytest.mark.parametrize("preset,overrides", [
    ("tiny", {}), ("tiny-llama", {}), ("tiny", dict(mlp="geglu", norm="rmsnorm")), ("tiny-bert", {}),
    ("tiny", dict(positions="sinusoidal", norm_placement="post", mlp="relu")), ("tiny-t5", {}),
    ("tiny", dict(family="seq2seq", norm="rmsnorm", n_decoder_layers=3))])
def test_activation_formula_matches_what_autograd_saves(preset, overrides):
    cfg = ModelConfig.from_preset(preset, **overrides)
    model = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 48))
    measured = saved_activation_bytes(model, dict(input_ids=ids, labels=torch.randint(0, cfg.vocab_size, (3, 48))))
    assert measured == pytest.approx(activation_bytes(cfg, 3, 48)["total"], rel=0.015)


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    cfg = ModelConfig.from_preset("gpt2")
    plain, ckpt = activation_bytes(cfg, 2, 1024, "bf16"), activation_bytes(cfg, 2, 1024, "bf16", checkpointing=True)
    # GPT-2's block keeps 16·d + heads + 4 values per token (see block_activation_elements); 2 bytes each in bf16
    assert plain["blocks"] == 12 * (16 * 768 + 12 + 4) * 2 * 2048
    assert ckpt["blocks"] == 12 * 768 * 2 * 2048 and ckpt["recompute"] == plain["blocks"] / 12
    assert ckpt["head"] == plain["head"]


def test_kv_cache_bytes_by_hand_and_as_allocated():
    llama = ModelConfig.from_preset("llama2-7b")
    assert kv_cache_bytes(llama, 1, 4096, "bf16") == 2 * 32 * 32 * 128 * 2 * 4096 == 2 * 2**30
    gqa = ModelConfig.from_preset("tiny-llama")
    cache = KVCache(gqa, batch=3, max_len=40, device="cpu")
    assert kv_cache_bytes(gqa, 3, 40, "fp32") == cache.keys.nbytes + cache.values.nbytes


def test_zero_stages_shard_optimizer_then_gradients_then_weights():
    memory = ModelMemory(parameters=10, trainable=10, weights=20.0, gradients=20.0, optimizer=80.0, master=40.0)
    split = {s: per_device_memory(memory, 5.0, 4, s) for s in ("ddp", "zero1", "zero2", "zero3")}
    assert split["ddp"]["total"] == 20 + 20 + 120 + 5
    assert split["zero1"]["optimizer"] == 30 and split["zero1"]["total"] == 20 + 20 + 30 + 5
    assert split["zero3"]["total"] == 5 + 5 + 30 + 5 and split["zero3"]["peak"] == 5 + 30 + 5
    # the paper's ZeRO-2 keeps whole weights: an FSDP engine's shard plus the gathered rest
    paper = per_device_memory(memory, 5.0, 4, "zero2", gathered=20.0 * 3 / 4)
    assert paper["weights"] == 20 and paper["gradients"] == 5 and paper["total"] == 20 + 5 + 30 + 5
    with_buckets = per_device_memory(memory, 50.0, 4, "ddp", buffers=20.0)
    assert with_buckets["total"] == 20 + 20 + 120 + 20 + 50 and with_buckets["peak"] == 20 + 120 + 20 + 50
    assert per_device_memory(memory, 5.0)["total"] == split["ddp"]["total"]


def test_lmforge_sharding_gathers_the_root_and_two_blocks_at_zero3():
    cfg = ModelConfig.from_preset("gpt2")
    memory = model_memory(cfg, "full", "fp32")
    blocks = 12 * block_parameters(cfg)
    assert lmforge_sharding(cfg, memory, "zero3", 2) == (4 * (count_parameters(cfg) - blocks + 2 * blocks / 12), 0)
    assert lmforge_sharding(cfg, memory, "zero2", 2) == (memory.weights, 0)
    assert lmforge_sharding(cfg, memory, "ddp", 2) == (0, memory.gradients)


def test_training_states_are_16_bytes_per_parameter_and_lora_trains_only_adapters():
    cfg = ModelConfig.from_preset("llama2-7b")
    n = count_parameters(cfg)
    assert model_memory(cfg, "full", "fp32").training == 16 * n
    mixed = model_memory(cfg, "full", "bf16")
    assert (mixed.weights, mixed.gradients, mixed.master, mixed.optimizer) == (2 * n, 2 * n, 4 * n, 8 * n)
    lora = model_memory(cfg, "lora", "bf16", lora_r=8, lora_targets=["q", "v"])
    adapters = 32 * 2 * 8 * (4096 + 4096)
    assert lora.trainable == adapters and lora.gradients == 4 * adapters and lora.optimizer == 8 * adapters
    qlora = model_memory(cfg, "qlora", "bf16")
    linear = matmul_parameters(cfg) - 32000 * 4096
    assert qlora.weights == pytest.approx(linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + (n - linear) * 2 + 4 * adapters)
    assert qlora.weights < 0.3 * mixed.weights
    assert training_memory_bytes(1_000_000_000) == 24e9


def test_flops_per_token_is_6n_plus_attention_term():
    cfg = ModelConfig.from_preset("gpt2")
    n = matmul_parameters(cfg)
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 1024 * 768
    assert flops_per_token(cfg, 1024, training=False) * 3 == flops_per_token(cfg, 1024)


def test_seq2seq_flops_count_encoder_self_decoder_self_and_cross_attention():
    cfg = ModelConfig.from_preset("t5-small")  # 6 + 6 layers, 8 heads of 64
    attention = 12 * (6 + 2 * 6) * 512 * 8 * 64
    assert flops_per_token(cfg, 512) == 6 * matmul_parameters(cfg) + attention


def test_compute_units():
    assert petaflop_s_days(8.64e19) == 1.0
    assert gpu_days(8.64e19, "a100", mfu=1.0) == pytest.approx(1e15 / 312e12)
    assert gpu_days(8.64e19, "v100", mfu=0.5) == pytest.approx(16.0)


def test_chinchilla_70b_on_1_4t_tokens():
    # 70B parameters ↔ 1.4T tokens, and C = 6ND ≈ 5.9e23 FLOPs (the Chinchilla model itself)
    assert compute_optimal_tokens(70_000_000_000) == 1_400_000_000_000
    compute = training_flops(70_000_000_000, 1_400_000_000_000)
    assert compute == pytest.approx(5.88e23)
    assert chinchilla_rule(compute) == pytest.approx((70e9, 1.4e12))
    # The fitted law with the published (rounded) constants: its optimum is a 32B model on 3.0T tokens, yet
    # 70B × 1.4T sits within 0.4% of that loss; the surface is that flat along 6ND = C.
    n, d = chinchilla_optimum(compute)
    assert 6 * n * d == pytest.approx(compute) and n == pytest.approx(32.5e9, rel=0.01)
    assert chinchilla_loss(70e9, 1.4e12) / chinchilla_loss(n, d) - 1 < 0.004


def test_chinchilla_closed_form_is_the_minimum_along_the_budget():
    compute = 1e21
    n, _ = chinchilla_optimum(compute)
    grid = [n * 1.01 ** k for k in range(-300, 301)]
    best = min(grid, key=lambda m: chinchilla_loss(m, compute / (6 * m)))
    assert best == pytest.approx(n, rel=0.011)


def test_estimate_report_for_a_preset_with_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "estimate.json", tmp_path / "scaling.png"
    run_estimate(EstimateConfig(model={"preset": "gpt2"}, precision="fp32", world_size=2, distributed="zero1",
                                batch_size=4, json=str(out), plot=str(png)))
    printed = capsys.readouterr().out
    assert "124,439,808" in printed and "zero3+ckpt" in printed and "fitted law" in printed
    report = json.loads(out.read_text())
    assert report["model"]["parameters"] == 124_439_808
    assert report["memory"]["chosen"] == report["memory"]["per_device"]["zero1"]
    assert report["compute"]["tokens"] == 20 * 124_439_808
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_estimate_reads_a_checkpoint_folder_and_a_hugging_face_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ModelConfig.from_preset("tiny-llama").save(ckpt / "config.json")
    report = estimate_report(EstimateConfig(checkpoint=str(ckpt), model={"n_layers": 4}))
    assert report["model"]["parameters"] == count_parameters(ModelConfig.from_preset("tiny-llama", n_layers=4))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024,
                                                "n_embd": 768, "n_layer": 12, "n_head": 12}))
    assert estimate_report(EstimateConfig(checkpoint=str(hf)))["model"]["parameters"] == 124_439_808


def test_compute_budget_alone_gives_the_compute_optimal_sizes():
    report = estimate_report(EstimateConfig(compute=5.88e23))
    assert set(report) == {"chinchilla"}
    assert report["chinchilla"]["rule"]["parameters"] == pytest.approx(70e9)


@pytest.mark.parametrize("options,message", [
    (dict(model={"preset": "gpt5"}), "unknown model preset 'gpt5'"),
    (dict(model={"preset": "gpt2"}, gpu="tpu"), "gpu='tpu' is not supported"),
    (dict(model={"preset": "gpt2"}, method="dora"), "method='dora' is not supported"),
    (dict(model={"preset": "gpt2"}, tokens=0), "tokens=0 must be a positive number"),
    (dict(model={"preset": "gpt2"}, tokens=-5e9), "tokens=-5000000000.0 must be a positive number"),
    (dict(model={"preset": "gpt2"}, world_size=0), "world_size=0 must be >= 1"),
    (dict(model={"preset": "gpt2"}, world_size=4), "world_size=4 needs --distributed"),
    (dict(model={"preset": "gpt2"}, precision="int8"), "--method full trains every weight"),
    (dict(model={"preset": "gpt2"}, method="lora", lora_targets=["wq"]), "lora target 'wq' is unknown"),
    (dict(model={"preset": "gpt2", "arch": "lstm"}), "the calculators cover transformers"),
    (dict(), "nothing to estimate"),
    (dict(checkpoint="/nonexistent/folder"), "has no config.json"),
])
def test_bad_input_is_one_clear_error(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("+", r"\+")) as info:
        estimate_report(EstimateConfig(**options))
    assert "\n" not in str(info.value)


def test_block_parameters_of_gpt2():
    assert block_parameters(ModelConfig.from_preset("gpt2")) == 12 * 768 * 768 + 13 * 768


def test_cli_prints_the_estimate_writes_json_and_checks_the_seeds(tmp_path):
    out = tmp_path / "estimate.json"
    done = run_cli("estimate", "--model.preset", "llama2-7b", "--world_size", "8", "--distributed", "zero3",
                   "--activation_checkpointing", "--json", str(out), "--check-seeds", "--format", "markdown")
    assert done.returncode == 0, done.stderr
    assert "6,738,415,616" in done.stdout and "| seed | claim (verbatim) | computation | verdict |" in done.stdout
    report = json.loads(out.read_text())
    assert report["memory"]["chosen"] == report["memory"]["per_device"]["zero3+ckpt"]
    assert len(report["seeds"]["claims"]) == 28


def test_cli_bad_input_is_one_line(tmp_path):
    done = run_cli("estimate", "--model.preset", "gpt2", "--tokens", "-1")
    assert_one_line_error(done.stderr, "tokens=-1.0 must be a positive number", done.returncode)
