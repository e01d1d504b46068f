"""The one training loop: it learns, resumes exactly, stops on NaN, and checkpoints round-trip."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from conftest import VARIANTS, make_model
from lmforge.checkpoint import load, model_tensors
from lmforge.data import RandomWindows
from lmforge.errors import UserError
from lmforge.models import IGNORE_INDEX
from lmforge.train import TrainConfig, TrainingDiverged, lr_at, save_checkpoint, train
from lmforge.train.checkpoint import read_trainer_state

N_SYMBOLS, LENGTH = 12, 8
SEP = N_SYMBOLS


def reverse_task(index: int, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """x SEP reverse(x): loss only on the reversed half, which is fully determined by x."""
    g = torch.Generator().manual_seed(index)
    x = torch.randint(0, N_SYMBOLS, (batch_size, LENGTH), generator=g)
    seq = torch.cat([x, torch.full((batch_size, 1), SEP), x.flip(1)], dim=1)
    labels = seq[:, 1:].clone()
    labels[:, : LENGTH] = IGNORE_INDEX
    return {"input_ids": seq[:, :-1], "labels": labels}


def test_tiny_model_learns_to_reverse_sequences():
    model = make_model("tiny-llama", vocab_size=N_SYMBOLS + 1, context_length=32)
    cfg = TrainConfig(steps=400, lr=3e-3, warmup_steps=20, weight_decay=0.0, progress=False)
    result = train(model, reverse_task, cfg)
    held_out = reverse_task(10_000_000, batch_size=256)
    with torch.no_grad():
        out = model(held_out["input_ids"], labels=held_out["labels"])
    assert out.loss.item() < 0.05, f"held-out loss {out.loss.item():.3f} (started at {result.losses[0]:.2f})"
    predicted = out.logits.argmax(-1)[:, LENGTH:]
    exact = (predicted == held_out["labels"][:, LENGTH:]).all(dim=1).float().mean()
    assert exact > 0.95


def _windows() -> RandomWindows:
    tokens = np.random.default_rng(0).integers(0, 64, 5000).astype(np.uint16)
    return RandomWindows(tokens, batch_size=4, context=32, seed=1)


def test_interrupted_and_resumed_run_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = TrainConfig(steps=24, warmup_steps=4, progress=False, save_every=8, log_every=4)
    spec = dict(vocab_size=64, context_length=32, dropout=0.1)  # dropout: the RNG state must resume too
    full = train(make_model("tiny", **spec), _windows(), cfg, out_dir=tmp_path / "full").losses

    windows = _windows()

    def crash_at_step_19(index: int):
        if index == 19:
            raise KeyboardInterrupt
        return windows(index)

    with pytest.raises(KeyboardInterrupt):
        train(make_model("tiny", **spec), crash_at_step_19, cfg, out_dir=tmp_path / "cut")
    resumed = train(make_model("tiny", seed=9, **spec), windows, cfg, out_dir=tmp_path / "cut", resume=True)
    assert resumed.losses == full[16:]  # bit-identical, from the step-16 checkpoint on
    state, _ = read_trainer_state(tmp_path / "cut" / "checkpoint")
    assert state["step"] == 24 and state["data_position"] == 24
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no duplicated lines after resume


def test_the_same_pretrain_config_gives_the_same_weights(tmp_path):
    from conftest import SAMPLE_TEXT
    from lmforge import DataConfig, PretrainConfig, TokenizerConfig, pretrain

    (tmp_path / "code.py").write_text(SAMPLE_TEXT)
    runs = [pretrain(PretrainConfig(
        out_dir=str(tmp_path / name), data=DataConfig(sources=[str(tmp_path / "code.py")]),
        tokenizer=TokenizerConfig(kind="char"), model={"preset": "tiny", "context_length": 32},
        train=TrainConfig(steps=3, batch_size=4, progress=False))) for name in ("a", "b")]
    first, second = (model_tensors(run.model) for run in runs)
    assert all(torch.equal(first[k], second[k]) for k in first)  # the initial weights are seeded too


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = make_model("tiny", vocab_size=64, context_length=32)
    windows = _windows()

    calls = []

    def poisoned_loss(m, batch):
        calls.append(1)
        loss = m(batch["input_ids"], labels=batch["labels"]).loss
        return loss * float("nan") if len(calls) == 14 else loss

    cfg = TrainConfig(steps=20, warmup_steps=2, progress=False, save_every=5)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 13; the last good checkpoint"):
        train(model, windows, cfg, loss_fn=poisoned_loss, out_dir=tmp_path)
    state, _ = read_trainer_state(tmp_path / "checkpoint")
    assert state["step"] == 10
    reloaded, _ = load(tmp_path / "checkpoint")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_save_then_load_gives_identical_logits(tmp_path, variant):
    spec = dict(VARIANTS[variant])
    model = make_model(spec.pop("preset"), **spec)
    save_checkpoint(tmp_path / "ckpt", model)
    again, tokenizer = load(tmp_path / "ckpt")
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tokenizer is None
    assert not any(p.name.endswith((".tmp", ".old")) for p in tmp_path.iterdir())


def test_loading_a_mismatched_checkpoint_names_the_problem(tmp_path):
    save_checkpoint(tmp_path / "ckpt", make_model("tiny"))
    (tmp_path / "ckpt" / "config.json").write_text(
        (tmp_path / "ckpt" / "config.json").read_text().replace('"d_model": 64', '"d_model": 32'))
    shape = r"\([^)]*{}[^)]*\)"  # the d_model the weights were saved with, then the one config.json now says
    with pytest.raises(UserError, match=rf"^weight '[\w.]+' in \S+model\.safetensors has shape {shape.format(64)}, "
                                        rf"the model {shape.format(32)}$"):
        load(tmp_path / "ckpt")


def test_warmup_then_cosine_schedule_shape():
    lrs = [lr_at(s, lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.55)  # halfway through the decay: (1 + 0.1) / 2
    assert lrs[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert math.isclose(lr_at(50, lr=1.0, total_steps=100, warmup_steps=0, min_lr_ratio=0.0, schedule="linear"), 0.5)


def test_grad_accumulation_matches_one_big_batch():
    big = RandomWindows(np.random.default_rng(1).integers(0, 64, 4000).astype(np.uint16), 8, 16, seed=2)

    def halves(index: int):
        batch = big(index // 2)
        part = slice(0, 4) if index % 2 == 0 else slice(4, 8)
        return {k: v[part] for k, v in batch.items()}

    base = dict(vocab_size=64, context_length=16)
    cfg = dict(steps=3, lr=0.5, warmup_steps=0, schedule="linear", progress=False, grad_clip=0.0)
    one = make_model("tiny", **base)
    two = make_model("tiny", **base)
    start = [p.detach().clone() for p in one.parameters()]
    # Plain SGD: each update is -lr * grad, so a gradient off by any factor shows in the weights (AdamW would
    # normalise a constant factor away, leaving only epsilon to tell).
    train(one, big, TrainConfig(batch_size=8, **cfg), optimizer=torch.optim.SGD(one.parameters(), lr=0.5))
    train(two, halves, TrainConfig(batch_size=4, grad_accum=2, **cfg),
          optimizer=torch.optim.SGD(two.parameters(), lr=0.5))
    assert max((a - s).abs().max() for a, s in zip(one.parameters(), start, strict=True)) > 1e-2  # it moved
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_target_loss_stops_the_run_early_and_checkpoints(tmp_path):
    model = make_model("tiny-llama", vocab_size=N_SYMBOLS + 1, context_length=32)
    cfg = TrainConfig(steps=400, lr=3e-3, warmup_steps=20, weight_decay=0.0, progress=False, eval_every=10,
                      eval_batches=2, target_loss=1.5)
    result = train(model, reverse_task, cfg, val_batches=lambda i: reverse_task(10**6 + i), out_dir=tmp_path)
    assert result.step < 400 and result.step % 10 == 0
    assert result.val_losses[-1][1] <= 1.5 < result.val_losses[0][1]
    state, _ = read_trainer_state(tmp_path / "checkpoint")
    assert state["step"] == result.step


def test_decay_steps_end_the_decay_early_then_hold_the_minimum(tmp_path):
    model = make_model("tiny", vocab_size=64, context_length=32)
    cfg = TrainConfig(steps=8, decay_steps=4, warmup_steps=0, lr=1e-3, min_lr_ratio=0.1, log_every=1, progress=False)
    train(model, _windows(), cfg, out_dir=tmp_path)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(1e-3) and lrs[4:] == pytest.approx([1e-4] * 4)
