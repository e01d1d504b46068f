"""Pruning (issue 12): exact sparsity, Wanda against a hand computation, N:M groups, shrunk models equal to the masked
ones, masks held through the training loop (and its resume), the gradual schedule, round trips, the recipe and its
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import SAMPLE_TEXT, assert_one_line_error, make_model, perturb, run_cli
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.compress.prune import (
    GradualPruning,
    PruningMasks,
    block_linears,
    calibration_batches,
    cubic_sparsity,
    lowest_k,
    plan_heads,
    plan_neurons,
    prune,
)
from lmforge.compress.storage import read_compression, save_compressed
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import build_model
from lmforge.recipes.compress_common import REPORT_FILE, CompressData
from lmforge.recipes.prune import PruneConfig, run_prune
from lmforge.tokenizer import train_char, train_unigram, train_wordpiece
from lmforge.train import TrainConfig, make_adamw, train

pytestmark = pytest.mark.usefixtures("one_thread")
FAMILIES = ["tiny", "tiny-llama", "tiny-t5", "tiny-bert"]


def model_of(preset: str, seed: int = 0, **overrides):
    """A tiny model of any family, moved off its init so biases, norms and every head matter."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig.from_preset(preset, **overrides)).eval()
    perturb(model, scale=0.05, seed=seed + 1)
    return model


def batches_for(model, n: int = 6, length: int = 24, batch_size: int = 3):
    ids = torch.randint(0, model.cfg.vocab_size, (n, length), generator=torch.Generator().manual_seed(7))
    return calibration_batches(model, ids, batch_size)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def pruned_fraction(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())


# -- exact sparsity ---------------------------------------------------------------------------------------------------
def test_lowest_k_breaks_ties_by_position_and_takes_exactly_k():
    scores = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5, 1.0, 2.0])
    assert lowest_k(scores, 3).tolist() == [False, True, True, False, True, False, False]  # 0.5, then the first 1s
    for k in range(scores.numel() + 1):
        assert int(lowest_k(scores, k).sum()) == k


def tied(model):
    """Weights on a coarse grid (none exactly 0), so many scores tie: a `<= threshold` rule would over-prune."""
    with torch.no_grad():
        for lin in block_linears(model).values():
            lin.weight.copy_(lin.weight.sign() * ((lin.weight.abs() * 100).round() + 1) / 100)
    return model


@pytest.mark.parametrize("scope", ["layer", "global", "row"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_magnitude_reaches_exactly_the_sparsity_asked(scope, sparsity):
    model = tied(model_of("tiny-llama"))
    prune(model, "magnitude", sparsity, scope=scope)
    linears = block_linears(model)
    zeros = {name: int((lin.weight == 0).sum()) for name, lin in linears.items()}
    if scope == "global":
        total = sum(lin.weight.numel() for lin in linears.values())
        assert sum(zeros.values()) == round(sparsity * total)
    for name, lin in linears.items():
        if scope == "layer":
            assert zeros[name] == round(sparsity * lin.weight.numel()), name
        if scope == "row":
            per_row = (lin.weight == 0).sum(dim=1)
            assert (per_row == round(sparsity * lin.in_features)).all(), name


def test_global_magnitude_keeps_the_largest_weights_of_all_layers():
    model = model_of("tiny")
    everything = torch.cat([lin.weight.detach().abs().reshape(-1) for lin in block_linears(model).values()])
    threshold = everything.sort().values[round(0.6 * everything.numel())]
    prune(model, "magnitude", 0.6, scope="global")
    for lin in block_linears(model).values():
        kept = lin.weight != 0
        assert (lin.weight.abs()[kept] >= threshold).all() and lin.weight.abs()[~kept].max() <= threshold


@pytest.mark.parametrize("preset", FAMILIES)
def test_wanda_prunes_exactly_s_of_every_row(preset):
    model = model_of(preset)
    outcome = prune(model, "wanda", 0.5, batches=batches_for(model))
    assert outcome.info["sparsity_reached"] == 0.5
    for name, lin in block_linears(model).items():
        assert ((lin.weight == 0).sum(dim=1) == lin.in_features // 2).all(), name
    # embeddings and heads are not targets
    assert pruned_fraction(model.embed.weight) == 0


def hand_wanda_keep(weight: torch.Tensor, inputs: torch.Tensor, sparsity: float) -> np.ndarray:
    """Wanda's rule written out with numpy: per row, drop the round(S * in) smallest |W_ij| * ||X_j||."""
    x = inputs.reshape(-1, inputs.shape[-1]).double().numpy()
    score = np.abs(weight.double().numpy()) * np.sqrt((x ** 2).sum(axis=0))[None, :]
    k = round(sparsity * weight.shape[1])
    keep = np.ones(score.shape, dtype=bool)
    for row in range(score.shape[0]):
        keep[row, np.argsort(score[row], kind="stable")[:k]] = False
    return keep


@pytest.mark.parametrize("layer", ["decoder.blocks.0.mlp.up", "decoder.blocks.1.attn.out"])
def test_wanda_pruned_set_equals_a_hand_computation(layer):
    model = model_of("tiny")
    batches = batches_for(model)
    target = model.get_submodule(layer)
    keep = hand_wanda_keep(target.weight.detach(), recorded_inputs(model, {layer: target}, batches)[layer], 0.4)
    # one-shot: every layer's activations from the dense model, as the hand computation saw them
    outcome = prune(model, "wanda", 0.4, batches=batches, sequential=False)
    assert np.array_equal(outcome.masks.masks[f"{layer}.weight"].numpy(), keep)
    assert np.array_equal((target.weight != 0).numpy(), keep)


def test_sequential_wanda_sees_the_pruned_blocks_before():
    """Block 0 reads the same input either way; block 1's input changes once block 0 is pruned."""
    model = model_of("tiny")
    batches = batches_for(model)
    one_shot = prune(model_of("tiny"), "wanda", 0.5, batches=batches, sequential=False).masks.masks
    sequential = prune(model, "wanda", 0.5, batches=batches).masks.masks
    first = [name for name in one_shot if ".blocks.0." in name]
    assert all(torch.equal(one_shot[name], sequential[name]) for name in first)
    assert any(not torch.equal(one_shot[name], sequential[name]) for name in one_shot if name not in first)


@pytest.mark.parametrize("preset", ["tiny", "tiny-t5"])
def test_sequential_wanda_equals_block_by_block_full_forwards(preset):
    """The cached-hidden-state order gives the masks of the plain definition: for each block in turn, full model
    forwards (earlier blocks already pruned) give its inputs' norms, then its rows are pruned."""
    model = model_of(preset)
    batches = batches_for(model)
    reference = model_of(preset)
    expected = {}
    for block_name in [name for name, module in reference.named_modules() if type(module).__name__ == "Block"]:
        linears = {name: lin for name, lin in block_linears(reference).items() if name.startswith(block_name + ".")}
        inputs = recorded_inputs(reference, linears, batches)
        for name, lin in linears.items():
            keep = hand_wanda_keep(lin.weight.detach(), inputs[name], 0.5)
            expected[f"{name}.weight"] = keep
            with torch.no_grad():
                lin.weight.masked_fill_(~torch.from_numpy(keep), 0.0)
    got = prune(model, "wanda", 0.5, batches=batches).masks.masks
    assert set(got) == set(expected)
    assert all(np.array_equal(got[name].numpy(), keep) for name, keep in expected.items())


def recorded_inputs(model, linears, batches) -> dict[str, torch.Tensor]:
    """Every token's input to each linear over full forwards of the model, as (tokens, in_features)."""
    seen = {name: [] for name in linears}
    handles = [lin.register_forward_pre_hook(lambda module, args, found=seen[name]: found.append(
        args[0].detach().reshape(-1, args[0].shape[-1]))) for name, lin in linears.items()]
    for batch in batches:
        logits(model, batch)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(found) for name, found in seen.items()}


# -- N:M --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny", "tiny-t5"])
@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_two_four_holds_in_every_group_of_four(preset, score):
    model = tied(model_of(preset))
    dense = {name: lin.weight.detach().clone() for name, lin in block_linears(model).items()}
    prune(model, "2:4", score=score, batches=batches_for(model))
    for name, lin in block_linears(model).items():
        groups = lin.weight.reshape(lin.out_features, -1, 4)
        assert ((groups != 0).sum(-1) == 2).all(), name  # exactly 2 of every 4 (the dense weights hold no 0)
        if score == "magnitude":  # the two kept are the two largest |w| of their group
            magnitudes = dense[name].abs().reshape(lin.out_features, -1, 4)
            kept = magnitudes.masked_fill(groups == 0, float("inf")).min(-1).values
            dropped = magnitudes.masked_fill(groups != 0, float("-inf")).max(-1).values
            assert (kept >= dropped).all(), name


def test_n_m_generalises():
    model = model_of("tiny")
    prune(model, "2:4", None, n=1, m=8)
    for lin in block_linears(model).values():
        assert ((lin.weight.reshape(lin.out_features, -1, 8) != 0).sum(-1) <= 1).all()


# -- structured: heads and neurons ------------------------------------------------------------------------------------
def masked_copy(model, plan):
    copy = build_model(model.cfg).eval()
    copy.load_state_dict(model.state_dict())
    plan.masks(copy).apply(copy)
    return copy


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("method", ["heads", "neurons"])
def test_shrunk_model_equals_the_masked_model(preset, method):
    model = model_of(preset)
    batches = batches_for(model)
    sparsity = 0.5 if method == "heads" else 0.3
    plan = (plan_heads if method == "heads" else plan_neurons)(model, sparsity, batches)
    outcome = prune(model, method, sparsity, batches=batches)
    masked = masked_copy(model, plan)
    for batch in batches[:2]:
        want, got = logits(masked, batch), logits(outcome.model, batch)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (want - logits(model, batch)).abs().max() > 1e-3  # removing them did change the outputs
    cfg, new = model.cfg, outcome.model.cfg
    if method == "heads":
        assert (new.n_heads, new.head_dim) == (cfg.n_heads // 2, cfg.head_dim)
        assert outcome.info["sparsity_reached"] == 0.5
    else:
        assert new.hidden_size == cfg.hidden_size - round(0.3 * cfg.hidden_size)


def removed_parameters(cfg: ModelConfig, method: str, heads: int = 0, groups: int = 0, neurons: int = 0) -> int:
    """Parameters freed per the shapes in lmforge.nn: q/k/v rows and out columns per head, or gate/up rows and down
    columns per neuron, in every self- (and cross-) attention or MLP."""
    d, hd = cfg.d_model, cfg.head_dim
    qkv_bias = cfg.attention_bias if cfg.qkv_bias is None else cfg.qkv_bias
    layers = cfg.n_layers + (cfg.decoder_layers if cfg.family == "seq2seq" else 0)
    if method == "neurons":
        per = neurons * (d * (2 if cfg.gated else 1) + d + (2 if cfg.gated else 1) * cfg.mlp_bias)
        return layers * per
    rows = (heads + 2 * groups) * hd
    per = rows * (d + qkv_bias) + heads * hd * d
    attentions = layers + (cfg.decoder_layers if cfg.family == "seq2seq" else 0)
    tables = cfg.relative_buckets * heads * 2 if cfg.positions == "relative" else 0  # one table per stack
    return attentions * per + tables


@pytest.mark.parametrize("preset", FAMILIES)
def test_parameter_count_falls_as_computed(preset):
    model = model_of(preset)
    batches = batches_for(model)
    cfg = model.cfg
    heads = prune(model, "heads", 0.5, batches=batches)
    expected = removed_parameters(cfg, "heads", heads=cfg.n_heads // 2, groups=cfg.kv_heads // 2)
    assert model.num_parameters() - heads.model.num_parameters() == expected
    assert heads.info["parameters_before"] - heads.info["parameters_after"] == expected
    neurons = prune(model, "neurons", 0.25, batches=batches)
    removed = round(0.25 * cfg.hidden_size)
    assert model.num_parameters() - neurons.model.num_parameters() == removed_parameters(cfg, "neurons",
                                                                                         neurons=removed)


def test_gqa_removes_whole_key_value_groups():
    model = model_of("tiny-llama", n_heads=4, n_kv_heads=2)
    outcome = prune(model, "heads", 0.5, batches=batches_for(model))
    cfg = outcome.model.cfg
    assert (cfg.n_heads, cfg.kv_heads, cfg.head_dim) == (2, 1, 16)
    for kept in outcome.info["kept"].values():
        assert kept in ([0, 1], [2, 3])  # a query group with its key/value head
    generated = outcome.model.new_cache(1, 8)  # the cache follows the new config
    assert generated.keys.shape[2] == 1


def test_multi_query_attention_removes_query_heads_and_keeps_its_key_value_head():
    model = model_of("tiny", n_kv_heads=1, norm="rmsnorm", mlp="geglu")
    batches = batches_for(model)
    plan = plan_heads(model, 0.5, batches)
    outcome = prune(model, "heads", 0.5, batches=batches)
    assert (outcome.model.cfg.n_heads, outcome.model.cfg.kv_heads) == (2, 1)
    torch.testing.assert_close(logits(outcome.model, batches[0]), logits(masked_copy(model, plan), batches[0]),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="would remove all 4 heads"):
        prune(model, "heads", 0.9, batches=batches)
    grouped = model_of("tiny-llama")
    with pytest.raises(UserError, match=r"would remove all 2 key/value head groups \(of 2 query heads each\)"):
        prune(grouped, "heads", 0.8, batches=batches_for(grouped))


def test_t5_self_attention_drops_the_same_heads_across_a_stack():
    """Each T5 stack shares one relative-position table, so its self-attention layers keep one head set."""
    model = model_of("tiny-t5", n_layers=3)
    outcome = prune(model, "heads", 0.5, batches=batches_for(model))
    kept = outcome.info["kept"]
    for stack in ("encoder", "decoder"):
        sets = {tuple(v) for k, v in kept.items() if k.startswith(stack) and k.endswith(".attn")}
        assert len(sets) == 1
    assert outcome.model.encoder.positions.relative.weight.shape == (model.cfg.relative_buckets, 2)


def test_shrunk_model_runs_smaller_matmuls():
    model = model_of("tiny")
    smaller = prune(model, "neurons", 0.5, batches=batches_for(model)).model
    assert smaller.decoder.blocks[0].mlp.up.weight.shape == (128, 64)
    assert smaller.decoder.blocks[0].mlp.down.weight.shape == (64, 128)


# -- recovery: masks through the loop, resume, gradual ---------------------------------------------------------------
def char_batches(tokenizer, batch_size: int = 4, context: int = 32):
    ids = torch.tensor(tokenizer.encode(SAMPLE_TEXT))

    def batch(index: int):
        g = torch.Generator().manual_seed(index)
        starts = torch.randint(0, len(ids) - context - 1, (batch_size,), generator=g)
        rows = torch.stack([ids[s:s + context + 1] for s in starts])
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}

    return batch


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_char([SAMPLE_TEXT])


def recovery_cfg(steps: int, **overrides) -> TrainConfig:
    values = dict(steps=steps, lr=3e-3, warmup_steps=0, batch_size=4, progress=False, eval_every=0,
                  save_every_minutes=0, weight_decay=0.1, schedule="constant")
    return TrainConfig(**(values | overrides))


def test_masks_hold_through_training_and_the_loss_falls(char_tokenizer, tmp_path):
    model = make_model("tiny", vocab_size=char_tokenizer.vocab_size)
    masks = prune(model, "magnitude", 0.5).masks
    optimizer = make_adamw(model, 3e-3, 0.1, (0.9, 0.95))
    result = train(model, char_batches(char_tokenizer), recovery_cfg(30), on_step=masks, optimizer=optimizer)
    for name, lin in block_linears(model).items():
        mask = masks.masks[f"{name}.weight"]
        assert (lin.weight[~mask] == 0).all() and (lin.weight[mask] != 0).all(), name
        state = optimizer.state[lin.weight]  # no momentum left to push a pruned weight off 0
        assert (state["exp_avg"][~mask] == 0).all() and (state["exp_avg_sq"][~mask] == 0).all(), name
    assert np.mean(result.losses[-5:]) < result.losses[0] - 0.3


def test_resume_keeps_the_masks(char_tokenizer, tmp_path):
    model = make_model("tiny", vocab_size=char_tokenizer.vocab_size)
    masks = prune(model, "magnitude", 0.6, scope="global").masks
    expected = {name: mask.clone() for name, mask in masks.masks.items()}
    batches = char_batches(char_tokenizer)
    with pytest.raises(_Crash):  # stop mid-run by a hook, like an interrupted job with its checkpoint written
        train(model, batches, recovery_cfg(10, save_every=4), out_dir=tmp_path, on_step=_stop_at(masks, 5))
    resumed_model = make_model("tiny", seed=3, vocab_size=char_tokenizer.vocab_size)
    fresh = PruningMasks({name: torch.ones_like(mask) for name, mask in expected.items()})  # knows nothing yet
    train(resumed_model, batches, recovery_cfg(10), out_dir=tmp_path, on_step=fresh, resume=True)
    assert all(torch.equal(fresh.masks[name], expected[name]) for name in expected)
    for name, lin in block_linears(resumed_model).items():
        assert (lin.weight[~expected[f"{name}.weight"]] == 0).all()


class _Crash(RuntimeError):
    """Raised by a hook to stop a training run part-way, as a crash would."""


def _stop_at(masks: PruningMasks, step: int):
    """The masks as on_step, crashing after `step` (the checkpoint at step 4 holds them)."""
    class Hook:
        def __call__(self, done, model, optimizer):
            masks(done, model, optimizer)
            if done == step:
                raise _Crash("stop")

        def state_dict(self):
            return masks.state_dict()

        def load_state_dict(self, values):
            masks.load_state_dict(values)

    return Hook()


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.8, 10) == 0
    assert cubic_sparsity(10, 0.8, 10) == 0.8 and cubic_sparsity(25, 0.8, 10) == 0.8
    assert cubic_sparsity(5, 0.8, 10) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    values = [cubic_sparsity(t, 0.8, 10) for t in range(11)]
    assert values == sorted(values)
    assert values[1] - values[0] > values[10] - values[9]  # fast at first, slow at the end


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_gradual_pruning_reaches_exactly_s(char_tokenizer, method):
    model = make_model("tiny", vocab_size=char_tokenizer.vocab_size)
    norms = None
    if method == "wanda":
        from lmforge.compress.prune import input_norms

        ids = torch.tensor(char_tokenizer.encode(SAMPLE_TEXT[:400]))[:384].reshape(6, 64)
        norms = input_norms(model, block_linears(model), calibration_batches(model, ids))
    hook = GradualPruning(model, 0.7, "layer" if method == "magnitude" else "row", end_step=8, every=2, norms=norms)
    seen = []

    class Record:
        def __call__(self, step, model, optimizer):
            hook(step, model, optimizer)
            seen.append(hook.sparsity()["overall"])

    train(model, char_batches(char_tokenizer), recovery_cfg(12), on_step=Record())
    assert seen[0] == 0.0 and 0 < seen[1] < seen[3] < seen[5] < seen[7] and seen[7:] == [seen[7]] * 5
    for name, lin in block_linears(model).items():  # from step 8 on: exactly S of each layer (of each row: wanda)
        exact = (round(0.7 * lin.weight.numel()) if method == "magnitude"
                 else lin.out_features * round(0.7 * lin.in_features))
        assert int((lin.weight == 0).sum()) == int((~hook.masks[f"{name}.weight"]).sum()) == exact, name


# -- round trips -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,method", [("tiny", "wanda"), ("tiny-llama", "heads"), ("tiny-t5", "neurons"),
                                           ("tiny-bert", "heads")])
def test_save_compressed_round_trip(tmp_path, preset, method):
    model = model_of(preset)
    batches = batches_for(model)
    outcome = prune(model, method, 0.5, batches=batches)
    save_compressed(tmp_path / "pruned", outcome.model, None, {"pruning": outcome.info})
    loaded, _ = load(tmp_path / "pruned")
    assert loaded.cfg == outcome.model.cfg
    for batch in batches[:2]:
        assert torch.equal(logits(loaded, batch), logits(outcome.model, batch))
    assert read_compression(tmp_path / "pruned")["pruning"]["method"] == method


# -- the recipe and its errors ---------------------------------------------------------------------------------------
DATA = ["--data.calibration_samples", "4", "--data.heldout_tokens", "600", "--data.decode_tokens", "4"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, char_tokenizer):
    w = tmp_path_factory.mktemp("prune")
    (w / "text.txt").write_text(SAMPLE_TEXT)
    model = make_model("tiny", vocab_size=char_tokenizer.vocab_size)
    perturb(model, seed=1)
    save(w / "ckpt", model, char_tokenizer)
    return w


def data_cfg(world) -> CompressData:
    return CompressData(sources=[str(world / "text.txt")], calibration_samples=4, heldout_tokens=600,
                        decode_tokens=4)


def test_run_prune_with_recovery_saves_masks_held_and_reports(world):
    train_cfg = recovery_cfg(6, eval_batches=2)
    report = run_prune(PruneConfig(model=str(world / "ckpt"), out=str(world / "wanda"), method="wanda",
                                   sparsity=0.5, recover_steps=6, train=train_cfg, data=data_cfg(world)))
    record = read_compression(world / "wanda")["pruning"]
    assert record["method"] == "wanda" and record["sparsity_reached"] == 0.5 and record["recovery"]["steps"] == 6
    assert set(record["per_layer"].values()) == {0.5}
    model, _ = load(world / "wanda")
    for lin in block_linears(model).values():
        assert ((lin.weight == 0).sum(dim=1) == lin.in_features // 2).all()
    saved = json.loads((world / "wanda" / REPORT_FILE).read_text())
    assert saved["compressed"]["block_sparsity"] == 0.5 == report["sparsity_reached"]
    assert (world / "wanda.recovery" / "metrics.jsonl").is_file()


def test_run_prune_resumes_its_recovery_run(world):
    """A second run with --resume re-prunes the same way, then the loop restores weights, optimizer and masks."""
    cfg = dict(model=str(world / "ckpt"), method="magnitude", sparsity=0.6, scope="global", report=False,
               data=data_cfg(world), train=recovery_cfg(1))
    run_prune(PruneConfig(out=str(world / "first"), recover_steps=4, run_dir=str(world / "run"), **cfg))
    run_prune(PruneConfig(out=str(world / "resumed"), recover_steps=7, run_dir=str(world / "run"), resume=True, **cfg))
    record = read_compression(world / "resumed")["pruning"]
    first, _ = load(world / "first")
    total = sum(lin.weight.numel() for lin in block_linears(first).values())
    assert record["recovery"]["steps"] == 7 and record["sparsity_reached"] == round(0.6 * total) / total
    steps = [json.loads(line)["step"] for line in (world / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[0] == 4 and steps[-1] == 7  # the first run's lines, then the rest
    resumed, _ = load(world / "resumed")
    for (name, a), b in zip(block_linears(first).items(), block_linears(resumed).values(), strict=True):
        assert torch.equal(a.weight == 0, b.weight == 0), name  # the same weights stay pruned
        assert not torch.equal(a.weight, b.weight), name  # and three more steps trained the rest


@pytest.mark.parametrize("preset,make_tokenizer,method", [
    ("tiny-t5", lambda docs: train_unigram(docs, 200, 8), "heads"),
    ("tiny-bert", lambda docs: train_wordpiece(docs, 200), "wanda"),
])
def test_run_prune_recovers_seq2seq_and_masked_models_with_their_own_objective(tmp_path, preset, make_tokenizer,
                                                                               method):
    (tmp_path / "text.txt").write_text(SAMPLE_TEXT)
    tokenizer = make_tokenizer([SAMPLE_TEXT])
    model = model_of(preset, vocab_size=tokenizer.vocab_size)
    save(tmp_path / "ckpt", model, tokenizer)
    data = CompressData(sources=[str(tmp_path / "text.txt")], calibration_samples=4, heldout_tokens=600,
                        decode_tokens=4)
    report = run_prune(PruneConfig(model=str(tmp_path / "ckpt"), out=str(tmp_path / "out"), method=method,
                                   sparsity=0.5, recover_steps=3, data=data, train=recovery_cfg(1, eval_batches=1)))
    record = read_compression(tmp_path / "out")["pruning"]
    assert record["recovery"]["steps"] == 3 and np.isfinite(record["recovery"]["last_loss"])
    if method == "heads":
        assert report["compressed"]["parameters"] < report["original"]["parameters"]
    else:
        assert report["compressed"]["block_sparsity"] == 0.5
    assert np.isfinite(report["compressed"]["perplexity"])


def test_run_prune_heads_writes_the_smaller_config(world):
    run_prune(PruneConfig(model=str(world / "ckpt"), out=str(world / "heads"), method="heads", sparsity=0.5,
                          report=False, data=data_cfg(world)))
    model, _ = load(world / "heads")
    assert (model.cfg.n_heads, model.cfg.d_head) == (2, 16)
    assert read_compression(world / "heads")["pruning"]["parameters_after"] == model.num_parameters()


def test_cli_prunes_end_to_end(world):
    result = run_cli("prune", "--model", str(world / "ckpt"), "--method", "2:4", "--score", "wanda", "--out",
                     str(world / "cli-24"), "--data.sources", str(world / "text.txt"), *DATA)
    assert result.returncode == 0, result.stderr
    model, _ = load(world / "cli-24")
    for lin in block_linears(model).values():
        assert ((lin.weight.reshape(lin.out_features, -1, 4) != 0).sum(-1) <= 2).all()
    assert "perplexity" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "random"], "--method 'random' is not a pruning method; choose one of: magnitude, wanda, 2:4"),
    (["--sparsity", "1.0"], "--sparsity 1.0 must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity -0.1 must be in [0, 1)"),
    (["--method", "2:4", "--n", "4", "--m", "4"], "needs 0 < n < m"),
    (["--method", "heads", "--sparsity", "0.9"], "would remove all 4 heads of every layer"),
    (["--method", "neurons", "--sparsity", "0.9999"], "would remove all 256 MLP neurons"),
    (["--gradual"], "--gradual prunes during recovery fine-tuning; give --recover_steps N > 0"),
    (["--method", "heads", "--gradual", "--recover_steps", "3"], "--gradual works with --method magnitude or wanda"),
])
def test_bad_inputs_get_one_line_errors(world, args, message, capsys):
    status = main(["prune", "--model", str(world / "ckpt"), "--out", str(world / "bad"), "--data.sources",
                   str(world / "text.txt"), *DATA, "--report", "false", *args])
    assert_one_line_error(capsys.readouterr().err, message, status)
    assert not (world / "bad").exists()


def test_a_bad_input_through_a_real_process(world):
    result = run_cli("prune", "--model", str(world / "ckpt"), "--out", str(world / "bad"), "--method", "2:4",
                     "--n", "3", "--m", "2")
    assert_one_line_error(result.stderr, "needs 0 < n < m", result.returncode)


def test_a_model_without_transformer_blocks_is_refused():
    with pytest.raises(UserError, match="has no transformer blocks"):
        prune(nn.Sequential(nn.Linear(4, 4)), "magnitude", 0.5)


def test_a_pruned_model_can_be_pruned_again_and_keeps_both_records(world):
    run_prune(PruneConfig(model=str(world / "ckpt"), out=str(world / "once"), method="heads", sparsity=0.5,
                          report=False, data=data_cfg(world)))
    run_prune(PruneConfig(model=str(world / "once"), out=str(world / "twice"), sparsity=0.5, report=False))
    record = read_compression(world / "twice")["pruning"]
    assert record["method"] == "magnitude" and record["previous"]["method"] == "heads"
    model, _ = load(world / "twice")
    assert model.cfg.n_heads == 2 and all(pruned_fraction(lin.weight) == 0.5 for lin in block_linears(model).values())


def test_a_quantized_input_is_refused(world, capsys):
    from lmforge.recipes.quantize import QuantizeConfig, run_quantize

    run_quantize(QuantizeConfig(model=str(world / "ckpt"), out=str(world / "int8"), method="int8", report=False))
    status = main(["prune", "--model", str(world / "int8"), "--out", str(world / "pruned-int8"), "--report", "false"])
    assert_one_line_error(capsys.readouterr().err, "is already quantized (int8); prune its full-precision original",
                          status)
