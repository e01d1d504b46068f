"""Distillation (issue 12): the loss against hand formulas, its sparse top-k form, the teacher in the one
training loop (causal and seq2seq), the on-disk teacher cache, and the recipe / CLI end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT, assert_one_line_error, make_model, run_cli
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.compress.distill import (
    DistillationLoss,
    TeacherBatches,
    TeacherCache,
    distillation_loss,
    init_from_teacher,
    model_logits,
    sparse_distillation_loss,
    teacher_layer_map,
    teacher_tail,
)
from lmforge.compress.storage import read_compression
from lmforge.config import ModelConfig
from lmforge.data import MaskedWindows, RandomWindows, SpanCorruptionBatches
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import build_model
from lmforge.recipes.compress_common import REPORT_FILE
from lmforge.recipes.distill import DistillConfig, run_distill
from lmforge.recipes.pretrain import DataConfig
from lmforge.tokenizer import train_char, train_unigram, train_wordpiece
from lmforge.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 32


def hand_loss(student, teacher, labels, alpha, temperature):
    """The formula written out position by position with explicit exp/log/sum."""
    kl_sum, ce_sum, count = 0.0, 0.0, 0
    for s_row, t_row, label in zip(student.double().reshape(-1, student.shape[-1]),
                                   teacher.double().reshape(-1, teacher.shape[-1]), labels.reshape(-1), strict=True):
        if label == -100:
            continue
        s_exp, t_exp = torch.exp(s_row / temperature), torch.exp(t_row / temperature)
        p_s, p_t = s_exp / s_exp.sum(), t_exp / t_exp.sum()
        kl_sum += float((p_t * (torch.log(p_t) - torch.log(p_s))).sum())
        ce_sum += float(-torch.log(torch.exp(s_row[label]) / torch.exp(s_row).sum()))
        count += 1
    kl, ce = kl_sum / count, ce_sum / count
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_equals_hand_computation(alpha, temperature):
    g = torch.Generator().manual_seed(1)
    student, teacher = 3 * torch.randn(2, 5, 11, generator=g), 3 * torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(11, (2, 5), generator=g)
    labels[0, 1] = labels[1, 4] = -100  # ignored by both terms
    loss, metrics = distillation_loss(student, teacher, labels, alpha, temperature)
    expected, kl, ce = hand_loss(student, teacher, labels, alpha, temperature)
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-5, abs=1e-6)
    assert metrics["ce"].item() == pytest.approx(ce, rel=1e-5)


def test_loss_is_fp32_under_bf16_logits():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    labels = torch.tensor([1, 2, 3])
    loss, _ = distillation_loss(student.bfloat16(), teacher.bfloat16(), labels, 0.5, 2.0)
    expected, _, _ = hand_loss(student.bfloat16().float(), teacher.bfloat16().float(), labels, 0.5, 2.0)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)


def test_zero_with_zero_gradient_when_student_is_teacher():
    g = torch.Generator().manual_seed(3)
    logits = 4 * torch.randn(2, 6, 13, generator=g)
    student = logits.clone().requires_grad_(True)
    labels = torch.randint(13, (2, 6), generator=g)
    loss, metrics = distillation_loss(student, logits, labels, 1.0, 2.0)
    loss.backward()
    assert abs(loss.item()) < 1e-6 and abs(metrics["kl"].item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_sparse_loss_with_k_equal_vocab_is_the_full_loss(alpha):
    g = torch.Generator().manual_seed(4)
    student = (2 * torch.randn(3, 4, 17, generator=g)).requires_grad_(True)
    teacher = 2 * torch.randn(3, 4, 17, generator=g)
    labels = torch.randint(17, (3, 4), generator=g)
    labels[2, 0] = -100
    values, indices = teacher.topk(17, dim=-1)
    full, full_metrics = distillation_loss(student, teacher, labels, alpha, 2.0)
    sparse, sparse_metrics = sparse_distillation_loss(student, values, indices, labels, alpha, 2.0)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5)
    assert sparse_metrics["kl"].item() == pytest.approx(full_metrics["kl"].item(), rel=1e-4, abs=1e-6)
    full_grad, = torch.autograd.grad(full, student)
    sparse_grad, = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse_grad, full_grad, rtol=1e-4, atol=1e-6)


def coarsened_hand_kl(student, teacher, k, temperature):
    """KL between both distributions at T, coarsened to the teacher's top-k tokens + one "any other" outcome."""
    total = 0.0
    for s_row, t_row in zip(student.double(), teacher.double(), strict=True):
        p_s = torch.exp(s_row / temperature) / torch.exp(s_row / temperature).sum()
        p_t = torch.exp(t_row / temperature) / torch.exp(t_row / temperature).sum()
        top = t_row.topk(k).indices
        rest = torch.ones_like(p_t, dtype=torch.bool)
        rest[top] = False
        q = torch.cat([p_t[top], p_t[rest].sum()[None]])
        p = torch.cat([p_s[top], p_s[rest].sum()[None]])
        total += float((q * (torch.log(q) - torch.log(p))).sum())
    return total / len(student)


def test_sparse_loss_with_the_tail_is_the_kl_over_top_k_plus_the_rest():
    g = torch.Generator().manual_seed(6)
    student, teacher = 2 * torch.randn(6, 30, generator=g), 2 * torch.randn(6, 30, generator=g)
    labels = torch.randint(30, (6,), generator=g)
    values, indices = teacher.topk(5, dim=-1)
    tail = teacher_tail(teacher, indices, 2.0)
    _, metrics = sparse_distillation_loss(student, values, indices, labels, 1.0, 2.0, tail)
    assert metrics["kl"].item() == pytest.approx(coarsened_hand_kl(student, teacher, 5, 2.0), rel=1e-5)
    _, full = distillation_loss(student, teacher, labels, 1.0, 2.0)
    _, renormalised = sparse_distillation_loss(student, values, indices, labels, 1.0, 2.0)
    assert metrics["kl"] < full["kl"]  # coarsening never increases a KL (the data-processing inequality)
    assert metrics["kl"] != renormalised["kl"]


def test_sparse_loss_with_an_empty_tail_is_the_full_loss_with_finite_gradients():
    g = torch.Generator().manual_seed(7)
    student = (2 * torch.randn(4, 17, generator=g)).requires_grad_(True)
    teacher = 2 * torch.randn(4, 17, generator=g)
    labels = torch.randint(17, (4,), generator=g)
    values, indices = teacher.topk(17, dim=-1)
    tail = teacher_tail(teacher, indices, 2.0)
    assert torch.isneginf(tail).all()
    full, _ = distillation_loss(student, teacher, labels, 0.5, 2.0)
    sparse, _ = sparse_distillation_loss(student, values, indices, labels, 0.5, 2.0, tail)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5)
    full_grad, = torch.autograd.grad(full, student)
    sparse_grad, = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse_grad, full_grad, rtol=1e-4, atol=1e-6)


def test_sparse_loss_with_small_k_is_close_for_a_peaked_teacher():
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(8, 50, generator=g)
    teacher[torch.arange(8), torch.randint(50, (8,), generator=g)] += 12  # nearly all mass on one token
    student = torch.randn(8, 50, generator=g)
    labels = torch.randint(50, (8,), generator=g)
    full, _ = distillation_loss(student, teacher, labels, 1.0, 1.0)
    values, indices = teacher.topk(4, dim=-1)
    sparse, _ = sparse_distillation_loss(student, values, indices, labels, 1.0, 1.0)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-2)  # the dropped tail: ~46 e^-12


@pytest.mark.parametrize(("alpha", "temperature", "message"), [
    (-0.1, 2.0, "alpha=-0.1 must be in [0, 1]"), (1.5, 2.0, "alpha=1.5 must be in [0, 1]"),
    (0.5, 0.0, "temperature=0.0 must be > 0"), (0.5, -1.0, "temperature=-1.0 must be > 0"),
])
def test_bad_options_are_refused(alpha, temperature, message):
    with pytest.raises(UserError, match=re.escape(message)):
        DistillationLoss(alpha, temperature)


# -- the teacher in the one training loop ----------------------------------------------------------------------------
def quiet(steps: int, **overrides) -> TrainConfig:
    options = dict(steps=steps, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=0, progress=False, device="cpu",
                   log_every=1)
    return TrainConfig(**{**options, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny causal teacher trained on SAMPLE_TEXT (char tokens) for 150 steps, saved with its tokenizer."""
    w = tmp_path_factory.mktemp("distill")
    (w / "text.txt").write_text(SAMPLE_TEXT)
    tokenizer = train_char([SAMPLE_TEXT])
    tokens = np.asarray(tokenizer.encode(SAMPLE_TEXT), dtype=np.int64)
    teacher = make_model("tiny", seed=1, vocab_size=tokenizer.vocab_size, context_length=CONTEXT)
    torch.manual_seed(0)
    result = train(teacher, RandomWindows(tokens, 8, CONTEXT, seed=7), quiet(150))
    assert result.losses[-1] < 1.0  # the teacher learned the repetitive text (uniform would be ~3.6)
    save(w / "teacher", teacher.eval(), tokenizer)
    return {"dir": w, "teacher": teacher, "tokenizer": tokenizer, "tokens": tokens}


def small_student(world, seed: int = 0):
    return make_model("tiny", seed=seed, vocab_size=world["tokenizer"].vocab_size, context_length=CONTEXT,
                      d_model=32, n_heads=2, n_layers=1).train()


@torch.no_grad()
def mean_kl(student, teacher, batches, n: int = 4) -> float:
    """KL(teacher || student) at T = 1 over n fixed batches (alpha = 1 makes the loss exactly that)."""
    student.eval()
    total = sum(distillation_loss(model_logits(student, batches(i)), model_logits(teacher, batches(i)),
                                  batches(i)["labels"], 1.0, 1.0)[1]["kl"].item() for i in range(n))
    return total / n


def test_a_student_distilled_from_a_trained_teacher_moves_towards_it(world):
    student = small_student(world)
    held_out = RandomWindows(world["tokens"], 8, CONTEXT, seed=99)
    before = mean_kl(student, world["teacher"], held_out)
    batches = TeacherBatches(RandomWindows(world["tokens"], 8, CONTEXT, seed=3), world["teacher"])
    result = train(student, batches, quiet(60), loss_fn=DistillationLoss(0.5, 2.0))
    after = mean_kl(student, world["teacher"], held_out)
    assert batches.teacher_calls == 60
    assert after < 0.5 * before, (before, after)
    assert result.losses[-1] < result.losses[0]


def test_metrics_jsonl_logs_kl_and_ce(world, tmp_path):
    batches = TeacherBatches(RandomWindows(world["tokens"], 8, CONTEXT, seed=3), world["teacher"])
    train(small_student(world), batches, quiet(3), loss_fn=DistillationLoss(0.5, 2.0), out_dir=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"kl", "ce", "loss"} <= set(line) for line in lines)
    # the logged loss is the combination of the logged parts (one micro-batch per step: no averaging between)
    assert all(line["loss"] == pytest.approx(0.5 * 4 * line["kl"] + 0.5 * line["ce"], rel=1e-4) for line in lines)


def test_validation_batches_without_the_teacher_give_the_students_own_loss(world):
    student = small_student(world).eval()
    batch = RandomWindows(world["tokens"], 4, CONTEXT, seed=5)(0)
    with torch.no_grad():
        got = DistillationLoss(0.5, 2.0)(student, batch)
        want = student(batch["input_ids"], labels=batch["labels"]).loss
    assert torch.equal(got, want)


def seq2seq_batches(seed: int):
    """T5 span corruption over a repetitive stream of ordinary ids (sentinels 200.., EOS 1, pad 0)."""
    tokens = np.tile(np.arange(3, 60), 40)
    return SpanCorruptionBatches(tokens, 4, CONTEXT, seed, sentinel_ids=list(range(200, 230)), eos_id=1, pad_id=0)


def test_seq2seq_distillation_steps_run_and_lower_the_loss():
    torch.manual_seed(1)
    teacher = build_model(ModelConfig.from_preset("tiny-t5", context_length=CONTEXT)).eval()
    torch.manual_seed(2)
    student = build_model(ModelConfig.from_preset("tiny-t5", context_length=CONTEXT, d_model=32, d_ff=64,
                                                  n_layers=1, n_heads=2))
    batches = TeacherBatches(seq2seq_batches(3), teacher)
    loss_fn = DistillationLoss(0.7, 2.0)
    probe = batches(0)
    assert probe["teacher_logits"].shape[:2] == probe["labels"].shape  # teacher forcing on the same labels
    with torch.no_grad():
        before = loss_fn(student.eval(), probe)[0].item()
    result = train(student, batches, quiet(15, lr=1e-2), loss_fn=loss_fn)
    assert batches.teacher_calls == 16  # the probe and one per step
    with torch.no_grad():
        after = loss_fn(student.eval(), probe)[0].item()
    assert after < before, (before, after)
    assert result.losses[-1] < result.losses[0]


def test_masked_lm_batches_distil_at_the_masked_positions():
    torch.manual_seed(1)
    teacher = build_model(ModelConfig.from_preset("tiny-bert", context_length=CONTEXT)).eval()
    student = build_model(ModelConfig.from_preset("tiny-bert", context_length=CONTEXT, d_model=32, n_heads=2))
    tokens = np.tile(np.arange(5, 90), 30)
    windows = MaskedWindows(tokens, 4, CONTEXT, 0, mask_id=4, random_ids=list(range(5, 200)), special_ids=[0, 1, 4])
    batch = TeacherBatches(windows, teacher)(0)
    labelled = int((batch["labels"] != -100).sum())
    assert batch["teacher_logits"].shape == (labelled, 256)
    loss, metrics = DistillationLoss(0.5, 2.0)(student, batch)
    assert torch.isfinite(loss) and metrics["kl"] > 0


# -- the teacher's top-k cache ---------------------------------------------------------------------------------------
RECORD = {"teacher": "t", "teacher_weights": "abc", "data": "d", "seed": 3, "batch_size": 8, "context_length": 32,
          "family": "causal", "objective": {}, "top_k": 8}


def cached_run(world, folder, steps: int = 6):
    cache = TeacherCache(folder, RECORD)
    batches = TeacherBatches(RandomWindows(world["tokens"], 8, CONTEXT, seed=3), world["teacher"], top_k=8,
                             cache=cache, temperature=2.0)
    calls = []
    hook = world["teacher"].register_forward_hook(lambda *args: calls.append(1))
    try:
        result = train(small_student(world), batches, quiet(steps), loss_fn=DistillationLoss(0.5, 2.0))
    finally:
        hook.remove()
    return result.losses, len(calls), batches.teacher_calls


def test_a_second_run_reads_the_cache_instead_of_the_teacher(world, tmp_path):
    first, first_calls, _ = cached_run(world, tmp_path / "cache")
    assert first_calls == 6 and len(list((tmp_path / "cache").glob("topk-*.safetensors"))) == 6
    stored = TeacherCache(tmp_path / "cache", RECORD).read(0)
    assert (stored["values"].dtype, stored["indices"].dtype, stored["tail"].dtype) == \
        (torch.float16, torch.int32, torch.float32)
    assert stored["values"].shape == (8, CONTEXT, 8) and stored["tail"].shape == (8, CONTEXT)
    second, second_calls, counted = cached_run(world, tmp_path / "cache")
    assert second_calls == 0 and counted == 0
    assert second == first  # same numbers: the first run trained on the fp16 values it cached
    longer, longer_calls, _ = cached_run(world, tmp_path / "cache", steps=8)  # only the new batches run the teacher
    assert longer_calls == 2 and longer[:6] == first


def test_a_cache_made_from_something_else_is_refused(tmp_path):
    TeacherCache(tmp_path / "cache", RECORD)
    for key, value in (("top_k", 4), ("teacher_weights", "other"), ("seed", 4), ("batch_size", 2)):
        with pytest.raises(UserError, match=f"was made with {key}="):
            TeacherCache(tmp_path / "cache", {**RECORD, key: value})
    TeacherCache(tmp_path / "cache", {**RECORD, "teacher": "moved/elsewhere"})  # same weights, another path
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="non-empty folder"):
        TeacherCache(tmp_path / "stuff", RECORD)


def test_top_k_options_are_checked(world, tmp_path):
    windows = RandomWindows(world["tokens"], 8, CONTEXT, seed=3)
    with pytest.raises(UserError, match="top_k=9999"):
        TeacherBatches(windows, world["teacher"], top_k=9999)
    with pytest.raises(UserError, match="pass --top_k"):
        TeacherBatches(windows, world["teacher"], cache=TeacherCache(tmp_path / "c", RECORD))


# -- the recipe ------------------------------------------------------------------------------------------------------
STUDENT = {"d_model": 32, "n_heads": 2, "n_layers": 1}


def recipe_config(world, out, **overrides) -> DistillConfig:
    options = dict(teacher=str(world["dir"] / "teacher"), student="tiny", student_model=dict(STUDENT),
                   out_dir=str(out), data=DataConfig(sources=[str(world["dir"] / "text.txt")], val_fraction=0.1),
                   train=quiet(12, eval_batches=2), report=False)
    return DistillConfig(**{**options, **overrides})


def test_run_distill_saves_a_loadable_student_and_reports_against_the_teacher(world, tmp_path):
    run = run_distill(recipe_config(world, tmp_path / "run", report=True, train=quiet(20, eval_batches=2)))
    model, tokenizer = load(run.model_dir)
    ids = torch.tensor([tokenizer.encode(SAMPLE_TEXT[:30])])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, run.student(ids).logits)
    assert tokenizer.encode(SAMPLE_TEXT[:30]) == world["tokenizer"].encode(SAMPLE_TEXT[:30])
    assert model.cfg.vocab_size == world["teacher"].cfg.vocab_size and model.cfg.d_model == 32
    record = read_compression(run.model_dir)["distillation"]
    assert record["steps"] == 20 and record["tokens"] == 20 * 8 * CONTEXT and record["alpha"] == 0.5
    assert record["student_parameters"] == model.num_parameters() < record["teacher_parameters"]
    report = json.loads((run.out_dir / REPORT_FILE).read_text())
    assert report["method"] == "distillation"
    assert report["compressed"]["parameters"] == model.num_parameters()
    assert report["original"]["perplexity"] < report["compressed"]["perplexity"]  # 20 steps: not the teacher yet
    assert run.result.losses[-1] < run.result.losses[0]


def test_the_recipe_cache_serves_a_second_student(world, tmp_path):
    first = run_distill(recipe_config(world, tmp_path / "a", top_k=8, teacher_cache=str(tmp_path / "cache")))
    second = run_distill(recipe_config(world, tmp_path / "b", top_k=8, teacher_cache=str(tmp_path / "cache"),
                                       student_model={"d_model": 48, "n_heads": 2, "n_layers": 1}))
    assert first.teacher_calls == 12 and second.teacher_calls == 0
    with pytest.raises(UserError, match="was made with seed="):
        run_distill(recipe_config(world, tmp_path / "c", top_k=8, teacher_cache=str(tmp_path / "cache"),
                                  train=quiet(12, seed=5)))


def test_a_resumed_distillation_equals_an_uninterrupted_one(world, tmp_path):
    constant = dict(schedule="constant", warmup_steps=0)
    whole = run_distill(recipe_config(world, tmp_path / "whole", train=quiet(8, **constant)))
    run_distill(recipe_config(world, tmp_path / "cut", train=quiet(4, **constant)))
    resumed = run_distill(recipe_config(world, tmp_path / "cut", train=quiet(8, **constant), resume=True))
    assert resumed.teacher_calls == 4
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_a_checkpoint_student_starts_from_its_weights(world, tmp_path):
    source = small_student(world, seed=4).eval()
    save(tmp_path / "student", source, world["tokenizer"])
    run = run_distill(recipe_config(world, tmp_path / "run", student=str(tmp_path / "student"), student_model={},
                                    train=quiet(1, lr=1e-12, warmup_steps=0, weight_decay=0.0)))
    a, b = source.state_dict(), run.student.state_dict()
    assert all(torch.allclose(a[k], b[k].cpu(), atol=1e-6) for k in a)


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(alpha=1.5), "alpha=1.5 must be in [0, 1]"),
    (dict(temperature=0.0), "temperature=0.0 must be > 0"),
    (dict(student="tiny-t5"), "is a seq2seq model but the teacher a causal one"),
    (dict(top_k=100000), "top_k=100000 is more than the teacher's vocabulary"),
    (dict(teacher_cache="somewhere"), "pass --top_k K"),
    (dict(student_model={"vocab_size": 300}), "student_model.vocab_size=300 differs from the teacher's"),
    (dict(student_model={"context_length": 64}), "longer than the teacher's 32"),
    (dict(student=""), "distill needs --teacher CHECKPOINT and --student"),
    (dict(resume=True), "nothing to resume"),
    (dict(report=True, data=DataConfig(val_fraction=0.0)), "data.val_fraction=0.0 must be in (0, 1)"),
])
def test_bad_recipe_inputs_get_one_line_errors(world, tmp_path, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        run_distill(recipe_config(world, tmp_path / "run", **overrides))
    assert not (tmp_path / "run").exists()  # a failed fresh run leaves no half-built folder


def test_a_checkpoint_student_with_another_vocabulary_is_refused(world, tmp_path):
    save(tmp_path / "student", make_model("tiny"), None)
    with pytest.raises(UserError, match=f"vocabulary of 256 tokens, the teacher {world['tokenizer'].vocab_size}"):
        run_distill(recipe_config(world, tmp_path / "run", student=str(tmp_path / "student"), student_model={}))


def test_the_student_preset_may_come_from_student_model_and_a_teacher_needs_its_tokenizer(world, tmp_path):
    run = run_distill(recipe_config(world, tmp_path / "run", student="", student_model={"preset": "tiny", **STUDENT},
                                    train=quiet(1)))
    assert run.student.cfg.d_model == 32 and read_compression(run.model_dir)["distillation"]["student"] == "tiny"
    with pytest.raises(UserError, match="disagree"):
        run_distill(recipe_config(world, tmp_path / "other", student_model={"preset": "tiny-llama"}))
    save(tmp_path / "bare", make_model("tiny"), None)
    with pytest.raises(UserError, match=r"has no tokenizer\.json"):
        run_distill(recipe_config(world, tmp_path / "other", teacher=str(tmp_path / "bare")))


@pytest.mark.parametrize(("preset", "make_tokenizer"), [
    ("tiny-t5", lambda docs: train_unigram(docs, 200, 8)),
    ("tiny-bert", lambda docs: train_wordpiece(docs, 200)),
])
def test_the_recipe_distils_seq2seq_and_masked_teachers(world, tmp_path, preset, make_tokenizer):
    tokenizer = make_tokenizer([SAMPLE_TEXT])
    teacher = build_model(ModelConfig.from_preset(preset, vocab_size=tokenizer.vocab_size, context_length=CONTEXT))
    save(tmp_path / "teacher", teacher.eval(), tokenizer)
    run = run_distill(recipe_config(world, tmp_path / "run", teacher=str(tmp_path / "teacher"), student=preset,
                                    student_model={"d_model": 32, "n_heads": 2}, top_k=4, train=quiet(3)))
    model, _ = load(run.model_dir)
    assert type(model) is type(teacher) and model.cfg.d_model == 32
    assert run.teacher_calls == 3 and all(np.isfinite(run.result.losses))


# -- the CLI ---------------------------------------------------------------------------------------------------------
def cli_args(world, out, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(world["dir"] / "teacher"), "--student", "tiny", "--student_model.d_model", "32",
            "--student_model.n_heads", "2", "--student_model.n_layers", "1", "--out_dir", str(out),
            "--data.sources", str(world["dir"] / "text.txt"), "--data.val_fraction", "0.1", "--train.steps", "6",
            "--train.batch_size", "4", "--train.eval_every", "0", "--train.eval_batches", "2",
            "--train.progress", "false", "--train.device", "cpu", "--report", "false", *extra]


def test_cli_distill_end_to_end(world, tmp_path):
    done = run_cli(*cli_args(world, tmp_path / "run", "--alpha", "0.7", "--top_k", "8", "--teacher_cache",
                             str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr
    model, tokenizer = load(tmp_path / "run" / "model")
    assert model.cfg.d_model == 32 and tokenizer.vocab_size == world["tokenizer"].vocab_size
    record = read_compression(tmp_path / "run" / "model")["distillation"]
    assert record["alpha"] == 0.7 and record["top_k"] == 8 and record["steps"] == 6
    assert len(list((tmp_path / "cache").glob("topk-*.safetensors"))) == 6
    assert main(["generate", "--model", str(tmp_path / "run" / "model"), "--prompt", "def f", "--max_new_tokens",
                 "4", "--device", "cpu"]) == 0  # `lmforge generate` takes the distilled folder as it is


@pytest.mark.parametrize(("extra", "message"), [
    (("--alpha", "2"), "alpha=2.0 must be in [0, 1]"),
    (("--temperature", "0"), "temperature=0.0 must be > 0"),
    (("--student", "tiny-t5"), "is a seq2seq model but the teacher a causal one"),
    (("--top_k", "100000"), "top_k=100000 is more than the teacher's vocabulary"),
])
def test_cli_bad_inputs_get_one_line_errors(world, tmp_path, extra, message, capsys):
    returncode = main(cli_args(world, tmp_path / "run", *extra))  # in-process: a subprocess per case is slow
    assert_one_line_error(capsys.readouterr().err, message, returncode)


# -- a student started from the teacher's blocks ---------------------------------------------------------------------
def test_a_student_with_all_the_teachers_blocks_is_the_teacher():
    teacher = make_model("tiny-llama", seed=1, tie_embeddings=False)
    student = make_model("tiny-llama", seed=2, tie_embeddings=False)
    assert init_from_teacher(student, teacher) == {"decoder.blocks": [0, 1]}
    ids = torch.randint(256, (2, 20))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_half_the_blocks_are_every_other_teacher_block_in_each_stack():
    assert teacher_layer_map(2, 4) == [0, 2] and teacher_layer_map(3, 6) == [0, 2, 4] and teacher_layer_map(1, 3) == [0]
    teacher = build_model(ModelConfig.from_preset("tiny-t5", n_layers=4, n_decoder_layers=2))
    student = build_model(ModelConfig.from_preset("tiny-t5", n_layers=2, n_decoder_layers=1, context_length=32))
    assert init_from_teacher(student, teacher) == {"encoder.blocks": [0, 2], "decoder.blocks": [0]}
    ours, theirs = student.state_dict(), teacher.state_dict()
    assert torch.equal(ours["encoder.blocks.1.attn.qkv.weight"], theirs["encoder.blocks.2.attn.qkv.weight"])
    assert torch.equal(ours["decoder.blocks.0.cross_attn.q.weight"], theirs["decoder.blocks.0.cross_attn.q.weight"])
    assert torch.equal(ours["embed.weight"], theirs["embed.weight"])


def test_a_learned_position_table_is_cut_to_the_students_context_and_widths_must_match():
    teacher = make_model("tiny", seed=1, n_layers=4)
    student = make_model("tiny", seed=2, n_layers=2, context_length=16)
    init_from_teacher(student, teacher)
    assert torch.equal(student.decoder.positions.learned.weight, teacher.decoder.positions.learned.weight[:16])
    with pytest.raises(UserError, match="in the student but"):
        init_from_teacher(make_model("tiny", d_model=32, n_heads=2), teacher)
    with pytest.raises(UserError, match="needs as many or fewer"):
        init_from_teacher(make_model("tiny", n_layers=6), teacher)


def test_the_recipe_starts_a_teacher_shaped_student_from_the_teacher(world, tmp_path):
    run = run_distill(recipe_config(world, tmp_path / "run", student="teacher", student_model={"n_layers": 1},
                                    init_from_teacher=True, train=quiet(1, lr=1e-12, warmup_steps=0,
                                                                        weight_decay=0.0)))
    ours, theirs = run.student.state_dict(), world["teacher"].state_dict()
    assert run.student.cfg.n_layers == 1 and run.student.cfg.d_model == world["teacher"].cfg.d_model
    assert torch.allclose(ours["decoder.blocks.0.mlp.up.weight"], theirs["decoder.blocks.0.mlp.up.weight"], atol=1e-6)
    assert read_compression(run.model_dir)["distillation"]["init_from_teacher"] is True
    with pytest.raises(UserError, match="is a checkpoint with weights of its own"):
        run_distill(recipe_config(world, tmp_path / "other", student=str(world["dir"] / "teacher"),
                                  student_model={}, init_from_teacher=True))


def test_alpha_zero_is_pretraining_the_same_student_on_the_same_batches_without_the_teacher(world, tmp_path):
    from lmforge.recipes.pretrain import PretrainConfig, TokenizerConfig, pretrain

    distilled = run_distill(recipe_config(world, tmp_path / "distill", alpha=0.0, train=quiet(5)))
    assert distilled.teacher_calls == 0
    scratch = pretrain(PretrainConfig(
        out_dir=str(tmp_path / "pretrain"), data=DataConfig(sources=[str(world["dir"] / "text.txt")], val_fraction=0.1),
        tokenizer=TokenizerConfig(path=str(world["dir"] / "teacher")),
        model={"preset": "tiny", "context_length": CONTEXT, **STUDENT}, train=quiet(5, eval_batches=2)))
    assert distilled.result.losses == scratch.result.losses
    a, b = distilled.student.state_dict(), scratch.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
