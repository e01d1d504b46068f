"""Ctrl-C and SIGTERM during `lmforge pretrain`: the step finishes, a checkpoint is written, the exit status is
what shells expect, one line says how to resume, and the resumed run ends bit-identical to an uninterrupted one."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import SAMPLE_TEXT, run_cli
from lmforge.checkpoint import load

STEPS = 120


def pretrain_args(corpus, out) -> list[str]:
    return ["pretrain", "--data.sources", str(corpus), "--tokenizer.kind", "char", "--model.preset", "tiny",
            "--model.context_length", "32", "--model.dropout", "0.1", "--out_dir", str(out),
            "--train.steps", str(STEPS), "--train.batch_size", "4", "--train.warmup_steps", "5",
            "--train.eval_every", "0", "--train.log_every", "1", "--train.progress", "false"]


def last_step(metrics) -> int:
    if not metrics.is_file():
        return 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return max((line["step"] for line in lines), default=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "code.py"
    path.write_text(SAMPLE_TEXT)
    return path


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_cli(*pretrain_args(corpus, out))
    assert result.returncode == 0, result.stderr
    return load(out / "checkpoint")[0].state_dict()


@pytest.mark.parametrize("sent, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_the_resumed_run_is_bit_exact(corpus, uninterrupted, tmp_path, sent,
                                                                       status):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", *pretrain_args(corpus, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while last_step(out / "metrics.jsonl") < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sent)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    lines = stderr.strip().splitlines()
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert 3 <= state["step"] < STEPS
    assert lines == [f"lmforge: interrupted: {sent.name} at step {state['step']}: checkpoint saved in "
                     f"{out / 'checkpoint'}; rerun the same command with --resume to continue"]
    assert "Traceback" not in stdout + stderr

    resumed = run_cli(*pretrain_args(corpus, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    weights = load(out / "checkpoint")[0].state_dict()
    assert all(torch.equal(weights[name], uninterrupted[name]) for name in uninterrupted)
