"""Shared fixtures: tiny models and corpora built in the test, nothing downloaded."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.models import CausalLM

# Architectures the shape/causality/caching tests sweep over.
VARIANTS = {
    "gpt2-like": dict(preset="tiny"),
    "llama-like-gqa": dict(preset="tiny-llama"),
    "post-norm-sinusoidal": dict(preset="tiny", norm_placement="post", positions="sinusoidal", mlp="relu"),
    "nope-relu2-untied": dict(preset="tiny", positions="none", mlp="relu2", tie_embeddings=False),
    "rmsnorm-geglu-learned": dict(preset="tiny", norm="rmsnorm", mlp="geglu", n_kv_heads=1),
}


def make_model(preset: str = "tiny", seed: int = 0, **overrides) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(ModelConfig.from_preset(preset, **overrides)).eval()


@pytest.fixture(params=sorted(VARIANTS))
def variant_model(request) -> CausalLM:
    spec = dict(VARIANTS[request.param])
    return make_model(spec.pop("preset"), **spec)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: a second thread only adds contention (use per module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SAMPLE_TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "class Greeter:\n    def __init__(self, name):\n        self.name = name\n\n"
    "    def greet(self):\n        return f'Hello, {self.name}!'\n\n"
) * 40


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`lmforge ARGS...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)
