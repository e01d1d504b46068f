"""What alignment, distillation and pruning build on: the loop's step hook, batches made by running the model,
an optimizer passed in, metrics from the loss, state saved for exact resume, and time-bounded checkpoints."""

import json

import pytest
import torch

from conftest import make_model
from lmforge.checkpoint import load
from lmforge.train import TrainConfig, lr_at, train
from lmforge.train.checkpoint import read_trainer_state

VOCAB, CONTEXT = 32, 16


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 4, "warmup_steps": 2, "progress": False, "log_every": 1,
                          "eval_every": 0, **overrides})


def tiny(seed: int = 0):
    return make_model("tiny", seed=seed, vocab_size=VOCAB, context_length=CONTEXT, dropout=0.1).train()


class Rollouts:
    """Batches made by sampling from the policy itself (as PPO does), reused for `epochs` micro-batches.

    The buffer lives between calls, so it is state: it goes into the checkpoint and comes back on resume."""

    def __init__(self, model: torch.nn.Module, epochs: int = 2) -> None:
        self.model, self.epochs = model, epochs
        self.buffer: torch.Tensor | None = None
        self.made = 0

    @torch.no_grad()
    def __call__(self, index: int) -> dict[str, torch.Tensor]:
        if index % self.epochs == 0:
            g = torch.Generator().manual_seed(index)
            ids = torch.randint(0, VOCAB, (4, 4), generator=g)
            for _ in range(CONTEXT - 4):
                probs = self.model(ids).logits[:, -1].float().softmax(-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
            self.buffer, self.made = ids, self.made + 1
        return {"input_ids": self.buffer, "labels": self.buffer}

    def state_dict(self) -> dict:
        return {"made": self.made, "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        self.made, self.buffer = state["made"], state["buffer"]


def clm_with_metrics(model, batch):
    out = model(batch["input_ids"], labels=batch["labels"])
    return out.loss, {"entropy": torch.distributions.Categorical(logits=out.logits.detach()).entropy().mean(),
                      "constant": 2.0}


def test_rollout_batches_with_state_resume_bit_exactly(tmp_path):
    model = tiny()
    full = train(model, Rollouts(model), config(), out_dir=tmp_path / "full", loss_fn=clm_with_metrics)

    cut = tiny()
    train(cut, Rollouts(cut), config(), out_dir=tmp_path / "cut", loss_fn=clm_with_metrics,
          on_step=lambda step, m, opt: step == 3)  # an odd step: the checkpoint holds a half-used rollout
    state, tensors = read_trainer_state(tmp_path / "cut" / "checkpoint")
    assert state["step"] == 3 and state["stateful"]["batches"] == {"made": 2} and "batches.buffer" in tensors

    again = tiny(seed=5)
    rollouts = Rollouts(again)
    resumed = train(again, rollouts, config(), out_dir=tmp_path / "cut", loss_fn=clm_with_metrics, resume=True)
    assert rollouts.made == 3  # restored 2, then made the one for steps 5-6
    assert resumed.losses == full.losses[3:]
    finished = [load(tmp_path / run / "checkpoint")[0].state_dict() for run in ("full", "cut")]
    assert all(torch.equal(finished[0][k], finished[1][k]) for k in finished[0])


def test_loss_metrics_are_averaged_into_the_metrics_file(tmp_path):
    seen = []

    def loss_fn(model, batch):
        loss, metrics = clm_with_metrics(model, batch)
        seen.append(float(metrics["entropy"]))
        return loss, metrics

    model = tiny()
    train(model, Rollouts(model), config(steps=4, log_every=2, grad_accum=2), out_dir=tmp_path, loss_fn=loss_fn)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert lines[0]["constant"] == pytest.approx(2.0)
    assert lines[0]["entropy"] == pytest.approx(sum(seen[:4]) / 4, abs=1e-5)  # 2 steps x 2 micro-batches
    assert lines[1]["entropy"] == pytest.approx(sum(seen[4:]) / 4, abs=1e-5)


def test_on_step_sees_every_step_and_a_passed_optimizer_keeps_its_group_ratios():
    model = tiny()
    head, rest = [model.decoder.final_norm.weight], [p for n, p in model.named_parameters()
                                                     if n != "decoder.final_norm.weight"]
    cfg = config(steps=5, lr=1e-3, warmup_steps=2)
    optimizer = torch.optim.AdamW([{"params": rest, "lr": 1e-3}, {"params": head, "lr": 1e-2}])
    calls = []
    train(model, Rollouts(model), cfg, optimizer=optimizer,
          on_step=lambda step, m, opt: calls.append((step, m is model, [g["lr"] for g in opt.param_groups])))
    assert [c[0] for c in calls] == [1, 2, 3, 4, 5] and all(c[1] for c in calls)
    for _, _, (body_lr, head_lr) in calls:
        assert head_lr == pytest.approx(10 * body_lr)  # the schedule scales each group from its own start
    assert calls[0][2][0] == pytest.approx(0.5e-3)  # warmup step 1 of 2


def test_the_default_optimizer_follows_the_schedule_exactly():
    model = tiny()
    lrs = []
    cfg = config(steps=4, warmup_steps=2)
    train(model, Rollouts(model), cfg, on_step=lambda s, m, opt: lrs.append([g["lr"] for g in opt.param_groups]))
    expected = [lr_at(s, lr=cfg.lr, total_steps=4, warmup_steps=2, min_lr_ratio=cfg.min_lr_ratio) for s in range(4)]
    assert lrs == [[lr, lr] for lr in expected]  # both AdamW groups (decay, no decay), bit for bit


@pytest.mark.parametrize("minutes, saved_step", [(1e-9, 2), (0.0, None)])
def test_time_bounded_checkpoints_keep_work_from_a_crash(tmp_path, minutes, saved_step):
    def crash_on_step_3(step, model, optimizer):
        if step == 3:
            raise RuntimeError("the machine went away")

    model = tiny()
    with pytest.raises(RuntimeError, match="went away"):
        train(model, Rollouts(model), config(save_every_minutes=minutes), out_dir=tmp_path, on_step=crash_on_step_3)
    folder = tmp_path / "checkpoint"
    if saved_step is None:
        assert not folder.exists()
    else:
        assert read_trainer_state(folder)[0]["step"] == saved_step
        load(folder)  # loadable


def test_negative_save_interval_is_a_user_error():
    from lmforge.errors import UserError

    with pytest.raises(UserError, match="save_every_minutes=-1"):
        TrainConfig(save_every_minutes=-1)


def test_measuring_the_matmul_peak_leaves_the_training_rng_alone():
    """MFU's peak is measured after a resume restored the RNG: drawing from it there broke exact resume."""
    from lmforge.estimate import measured_matmul_peak

    before = torch.get_rng_state()
    assert measured_matmul_peak("cpu", size=64, trials=1, seconds=0.001) > 0
    assert torch.equal(torch.get_rng_state(), before)
