import pytest
from torch import nn

from conftest import VARIANTS, make_model
from lmforge.config import ModelConfig
from lmforge.estimate import (
    compute_optimal_tokens,
    flops_per_token,
    matmul_parameters,
    training_flops,
    training_memory_bytes,
)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_matmul_parameters_count_every_linear_weight_once(name):
    spec = dict(VARIANTS[name])
    model = make_model(spec.pop("preset"), **spec)
    linear_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_parameters(model.cfg) == linear_weights


def test_flops_per_token_is_6n_plus_attention_term():
    cfg = ModelConfig.from_preset("gpt2")
    n = matmul_parameters(cfg)
    assert flops_per_token(cfg, 1024) == 6 * n + 12 * 12 * 1024 * 768
    assert flops_per_token(cfg, 1024, training=False) * 3 == flops_per_token(cfg, 1024)


def test_training_memory_rule_of_thumb_is_24_bytes_per_parameter():
    assert training_memory_bytes(1_000_000_000) == 24e9


def test_chinchilla_arithmetic():
    # 70B parameters ↔ 1.4T tokens, and C = 6ND ≈ 5.9e23 FLOPs (the Chinchilla model itself)
    assert compute_optimal_tokens(70_000_000_000) == 1_400_000_000_000
    assert training_flops(70_000_000_000, 1_400_000_000_000) == pytest.approx(5.88e23)
