"""Distributed training (issue 15 part A): one torchrun launch of 2 gloo processes (tests/distributed_worker.py)
trains the same tiny model under DDP, ZeRO-1 and FSDP2 as ZeRO-2/3, resumes, runs `lmforge pretrain`, and ends
with a failing rank; every result is compared here with one process at the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE_TEXT, assert_one_line_error
from lmforge.cli import main as cli
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.interop import load
from lmforge.models import CausalLM
from lmforge.train import TrainConfig, train

WORLD, PER_RANK_ACCUM = 2, 2
ONE_PROCESS_ACCUM = WORLD * PER_RANK_ACCUM  # the same global batch in one process
TOLERANCE = dict(atol=2e-5, rtol=1e-5)  # fp32: the ranks only sum the same numbers in another order


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The one torchrun launch: (its output folder, the per-run losses, the completed process)."""
    root = tmp_path_factory.mktemp("distributed")
    corpus = root / "code.py"
    corpus.write_text(SAMPLE_TEXT * 3)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
               str(Path(worker.__file__)), str(root / "out"), str(corpus)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = root / "out" / "results.json"
    assert results.is_file(), done.stderr[-5000:]
    return root / "out", json.loads(results.read_text()), done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, grad_accum = world x grad_accum: per optimizer, (losses, final weights)."""
    torch.set_num_threads(1)
    runs = {}
    for optimizer in ("adamw", "sgd"):
        out = tmp_path_factory.mktemp(f"one-{optimizer}")
        losses = worker.run("none", out, ONE_PROCESS_ACCUM, optimizer)
        runs[optimizer] = losses, load_file(str(out / "checkpoint" / "model.safetensors"))
    return runs


def assert_same_weights(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    got = load_file(str(folder / "checkpoint" / "model.safetensors"))
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **TOLERANCE, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mode", worker.MODES)
def test_two_processes_train_as_one_with_the_same_global_batch(launched, reference, mode, optimizer):
    out, results, _ = launched
    name = mode if optimizer == "adamw" else f"sgd-{mode}"
    losses, weights = reference[optimizer]
    # the losses of every step and the validation loss (3 batches over 2 ranks) as one process logs them
    assert results[name] == pytest.approx(losses, abs=2e-5)
    assert_same_weights(out / name, weights)
    assert len((out / name / "metrics.jsonl").read_text().splitlines()) == worker.STEPS + 1  # rank 0 alone


@pytest.mark.parametrize("mode", worker.RESUMED)
def test_a_run_saved_at_world_size_2_resumes_at_2_exactly(launched, reference, mode):
    out, results, _ = launched
    losses, weights = reference["adamw"]
    assert results[f"resume-{mode}"] == pytest.approx(losses[worker.HALF:], abs=2e-5)
    assert_same_weights(out / f"resume-{mode}", weights)


@pytest.mark.parametrize("mode", worker.RESUMED)
def test_a_run_saved_at_world_size_2_resumes_in_one_process_exactly(launched, reference, tmp_path, mode):
    out, _, _ = launched
    shutil.copytree(out / f"half-{mode}", tmp_path / "run")
    losses, weights = reference["adamw"]
    assert worker.run("none", tmp_path / "run", ONE_PROCESS_ACCUM, resume=True) == pytest.approx(
        losses[worker.HALF:], abs=2e-5)
    assert_same_weights(tmp_path / "run", weights)


def test_resuming_with_another_global_batch_is_a_clear_error(launched, tmp_path):
    out, _, _ = launched
    shutil.copytree(out / "half-zero3", tmp_path / "run")
    with pytest.raises(UserError, match=r"4 micro-batches per step .* pass --train.grad_accum 4"):
        worker.run("none", tmp_path / "run", PER_RANK_ACCUM, resume=True)


def test_the_consolidated_checkpoint_loads_in_one_process_and_the_sharded_one_is_beside_it(launched, reference):
    out, _, _ = launched
    model, _ = load(out / "zero3" / "checkpoint")
    expected = worker.tiny_model()
    expected.load_state_dict(reference["adamw"][1], strict=False)
    ids = worker.batches(0)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected.eval()(ids).logits, **TOLERANCE)
    sharded = out / "zero3" / "checkpoint_sharded"
    assert json.loads((sharded / "lmforge_sharded.json").read_text()) == {"step": 4, "world_size": 2,
                                                                            "mode": "zero3"}
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_torchrun_pretrain_cli_end_to_end(launched):
    out, results, _ = launched
    assert results["cli"] == 0
    run = out / "cli"
    model, tokenizer = load(run / "checkpoint")
    assert tokenizer is not None and model.cfg.context_length == 32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3] and any("val_loss" in r for r in records)
    assert (run / "loss.png").is_file() and (run / "checkpoint_sharded" / "lmforge_sharded.json").is_file()


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(launched):
    out, results, _ = launched
    assert results["interrupted"] == worker.HALF  # rank 0 stopped too, at rank 1's step (no deadlock)
    state = json.loads((out / "interrupted" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == worker.HALF and state["world_size"] == 2


def test_a_failing_rank_stops_the_run_with_its_error(launched):
    _, _, done = launched
    assert done.returncode != 0  # torchrun ended (no hang) and reports the failure
    assert "lmforge: error: micro-batch 3 is broken on rank 1" in done.stderr


def test_a_distributed_mode_without_torchrun_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = cli(["pretrain", "--out_dir", str(tmp_path / "run"), "--train.distributed", "fsdp"])
    assert_one_line_error(capsys.readouterr().err, "--train.distributed fsdp needs torchrun: torchrun --standalone",
                          code)
    assert not (tmp_path / "run").exists()


def test_several_processes_without_a_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match=r"torchrun started 2 processes but --train.distributed is none"):
        train(worker.tiny_model(), worker.batches, TrainConfig(steps=1, device="cpu", progress=False))
    with pytest.raises(UserError, match="'zero4' is not one of: none, ddp, zero1, zero2, zero3, fsdp"):
        TrainConfig(distributed="zero4")


def test_resuming_a_checkpoint_of_another_model_is_a_clear_error(launched, tmp_path):
    out, _, _ = launched
    shutil.copytree(out / "half-zero1", tmp_path / "run")
    cfg = worker.config("none", ONE_PROCESS_ACCUM, "adamw")
    other = CausalLM(ModelConfig.from_preset("tiny", d_model=32, n_heads=2))
    with pytest.raises(UserError, match=r"has shape \(64,\), the model \(32,\)"):
        train(other, worker.batches, cfg, out_dir=tmp_path / "run", resume=True)
