"""Distillation (issue 12): the loss against hand formulas, its sparse top-k form, the teacher in the one
training loop (causal and seq2seq), the on-disk teacher cache, and the recipe / CLI end to end."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.compress.distill import (
    TEACHER_KEYS,
    DistillationLoss,
    TeacherBatches,
    TeacherCache,
    distillation_loss,
    sparse_distillation_loss,
)
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.models import Seq2SeqLM
from lmforge.train import TrainConfig, train
from conftest import make_model


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
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillationLoss(alpha, temperature)
