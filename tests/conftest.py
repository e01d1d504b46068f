"""Shared fixtures: tiny models and corpora built in the test, nothing downloaded."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

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


# The repository's data folder (../shared/data), where a machine has it; tests that read it skip or fall back.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file_or_fallback(path: Path) -> bool:
    """Whether a ../shared/data file is there. A test that then falls back to data of its own must not do so
    silently: it warns locally and fails on CI (LMFORGE_FAIL_ON_SKIP=1), like a skip."""
    if path.is_file():
        return True
    if _fail_on_skip():
        pytest.fail(f"{path} is missing; a test would fall back to its own data")
    import warnings

    warnings.warn(f"{path} is missing: falling back to data written in the test", stacklevel=2)
    return False


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int | None = None, trainable_only: bool = False):
    """Add scale * N(0, 1) to every parameter (or every trainable one): biases and norms start at 0/1 and LoRA's B
    at zero, so move them all so that each one matters. seed=None draws from torch's global generator."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))


def greedy_by_full_recompute(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens after `prompt`, each from a full forward pass over everything so far (no cache)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


def assert_one_line_error(stderr: str, message: str, returncode: int | None = None, expected_code: int = 2):
    """A user mistake: exit code 2 (when returncode is given), exactly one non-blank stderr line, containing
    `message`, and no traceback."""
    if returncode is not None:
        assert returncode == expected_code, (returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert message in lines[0], (message, stderr)
    assert "Traceback" not in stderr, stderr


SAMPLE_TEXT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "class Greeter:\n    def __init__(self, name):\n        self.name = name\n\n"
    "    def greet(self):\n        return f'Hello, {self.name}!'\n\n"
) * 40


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """`lmforge ARGS...` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


# --- Skips must not hide missing parts (issue 17) ---------------------------------------------------------------
# A missing test extra (transformers, peft, sentence-transformers) or a missing ../shared/data makes tests skip.
# Locally one summary line says what was skipped and why; on CI (LMFORGE_FAIL_ON_SKIP=1, set by .ci/run) every
# skip is a failure that names its reason.
FAIL_ON_SKIP_VARIABLE = "LMFORGE_FAIL_ON_SKIP"
_SKIP_AS_FAILURE = f"{FAIL_ON_SKIP_VARIABLE}=1 makes every skip a failure; this test skipped: "


def _fail_on_skip() -> bool:
    import os

    return os.environ.get(FAIL_ON_SKIP_VARIABLE) == "1"


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix(_SKIP_AS_FAILURE).removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and _fail_on_skip():
        report.outcome = "failed"
        report.longrepr = f"{_SKIP_AS_FAILURE}{_skip_reason(report)}"


def pytest_sessionfinish(session, exitstatus):
    # Whole modules skipped at collection (pytest.importorskip) are no test report to turn into a failure;
    # they fail the session instead (named by the summary line).
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and _fail_on_skip() and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from collections import Counter

    reports = terminalreporter.stats.get("skipped", [])
    if _fail_on_skip():
        reports = reports + [r for kind in ("failed", "error") for r in terminalreporter.stats.get(kind, [])
                             if str(r.longrepr).startswith(_SKIP_AS_FAILURE)]
    if not reports:
        return
    counts = Counter(_skip_reason(r) for r in reports)
    grouped = "; ".join(f"{n} x {reason}" for reason, n in counts.most_common())
    verdict = "failures on CI" if _fail_on_skip() else f"allowed here; {FAIL_ON_SKIP_VARIABLE}=1 makes them failures"
    terminalreporter.write_line(f"SKIPPED {len(reports)} ({verdict}): {grouped}", yellow=True, bold=True)
