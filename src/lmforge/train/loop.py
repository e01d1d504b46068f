"""THE training loop. Every recipe hands it a model, a batch function and a `loss_fn(model, batch)`.

Batches come from `batches(index)`, a pure function of the micro-batch index, so the data
position saved in a checkpoint is simply the step, and `resume` replays the exact run.

What alignment, distillation and pruning need comes in through the same door, never a copy of the loop:
- `batches(index)` may run the model (PPO/GRPO rollouts; a teacher's logits);
- `loss_fn` may return `(loss, {"name": value})`, and the named values are averaged into metrics.jsonl;
- `on_step(step, model, optimizer)` runs after every optimizer step (masks, schedules, early stops);
- `optimizer` may be passed in (several parameter groups, each with its own learning rate);
- a `batches` or `on_step` object with `state_dict()` / `load_state_dict()` is saved in the trainer state
  and restored on resume (a rollout buffer, a KL controller), so resume stays exact.

Ctrl-C or SIGTERM finishes the current step, writes a checkpoint and raises `TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from lmforge.checkpoint import WEIGHTS_FILE, load_model_tensors
from lmforge.device import autocast_for, pick_device
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.estimate import peak_flops
from lmforge.train.checkpoint import (
    optimizer_tensors,
    read_trainer_state,
    restore_optimizer,
    save_checkpoint,
)
from lmforge.train.optim import SCHEDULES, lr_at, make_adamw

Batch = dict[str, Any]
Metrics = dict[str, torch.Tensor | float]
LossFn = Callable[[nn.Module, Batch], torch.Tensor | tuple[torch.Tensor, Metrics]]
BatchFn = Callable[[int], Batch]
StepHook = Callable[[int, nn.Module, torch.optim.Optimizer], bool | None]
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoint"


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainConfig:
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=12, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of the peak"})
    warmup_steps: int = 100
    decay_steps: int | None = field(default=None, metadata={
        "help": "steps over which lr decays to its minimum, then stays there (nanoGPT's lr_decay_iters); "
                "unset = train.steps"})
    schedule: str = field(default="cosine", metadata={"help": "cosine | linear | constant"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm; 0 disables"})
    eval_every: int = field(default=250, metadata={"help": "steps between validation runs; 0 = only at the end"})
    eval_batches: int = 20
    log_every: int = 10
    save_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0 = only at the end"})
    save_every_minutes: float = field(default=15.0, metadata={
        "help": "also checkpoint once this many minutes passed since the last one, so a crash loses at most that "
                "much work; 0 = off"})
    precision: str = field(default="auto", metadata={"help": "auto | fp32 | bf16 (auto: bf16 only where fast)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    seed: int = 1337
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    target_loss: float | None = field(default=None, metadata={"help": "stop once validation loss <= this"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise UserError(f"train.lr={self.lr} must be a positive number")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule='{self.schedule}' is not one of: {', '.join(SCHEDULES)}")
        if self.save_every < 0 or self.save_every_minutes < 0:
            raise UserError(f"train.save_every={self.save_every} and train.save_every_minutes="
                            f"{self.save_every_minutes} must be >= 0 (0 turns them off)")
        pick_device(self.device)  # a bad or absent device fails with the config, before any data or model work
        if self.precision not in ("auto", "fp32", "bf16"):
            raise UserError(f"train.precision='{self.precision}' is not one of: auto, fp32, bf16")


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    val_losses: list[tuple[int, float]]
    checkpoint: Path | None
    seconds: float


def clm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy: the pre-training objective."""
    return model(batch["input_ids"], labels=batch["labels"]).loss


def mlm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Masked-LM cross-entropy, with logits computed only at the masked positions."""
    return model(**batch, labelled_only=True).loss


def batch_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss on a batch whose keys are its forward's arguments (seq2seq, classifiers)."""
    return model(**batch).loss


FAMILY_LOSSES: dict[str, LossFn] = {"causal": clm_loss, "masked": mlm_loss, "seq2seq": batch_loss}


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, batches: BatchFn, n_batches: int, device: torch.device,
                  precision: str = "auto") -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    with autocast_for(device, precision):
        for i in range(n_batches):
            total += split_loss(loss_fn(model, _to(batches(i), device)))[0].item()
    model.train(was_training)
    return total / n_batches


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _Metrics:
    """metrics.jsonl writer; on resume, keeps only the lines up to the resumed step."""

    def __init__(self, out_dir: Path | None, resume_step: int) -> None:
        self.path = out_dir / METRICS_FILE if out_dir else None
        if self.path is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step and self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines() if json.loads(ln).get("step", 0) <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(
    model: nn.Module,
    batches: BatchFn,
    cfg: TrainConfig,
    *,
    loss_fn: LossFn = clm_loss,
    val_batches: BatchFn | None = None,
    out_dir: str | Path | None = None,
    tokens_per_step: int | None = None,
    flops_per_token: float | None = None,
    save: Callable[[Path, dict, dict], None] | None = None,
    restore: Callable[[Path], None] | None = None,
    resume: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    on_step: StepHook | None = None,
) -> TrainResult:
    """Optimise `model` for cfg.steps steps of loss_fn over batches(0), batches(1), ...

    save(folder, state, tensors) writes a checkpoint (defaults to model + trainer state); restore(folder)
    reads back what `save` wrote of the model on --resume (defaults to the full weights);
    tokens_per_step and flops_per_token turn on tokens/s and MFU in the logs. optimizer replaces the default
    AdamW: the schedule scales each group's own starting lr (cfg.lr is the peak the schedule is drawn for).
    on_step(step, model, optimizer) runs after each optimizer step; returning True ends the run (checkpointed).
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    device = pick_device(cfg.device)
    model.to(device).train()
    torch.manual_seed(cfg.seed)
    optimizer = optimizer or make_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    save = save or (lambda folder, state, tensors: save_checkpoint(folder, model, None, state, tensors))
    stateful = {name: obj for name, obj in (("batches", batches), ("on_step", on_step)) if hasattr(obj, "state_dict")}
    start = _resume(out_dir, model, optimizer, cfg, device, restore, stateful) if resume else 0
    forward_model = torch.compile(model) if cfg.compile else model
    checkpoint_dir = out_dir / CHECKPOINT_DIR if out_dir else None
    log = _Log(out_dir, start, cfg, tokens_per_step, flops_per_token, device, checkpoint_dir)
    amp = autocast_for(device, cfg.precision)
    last_save = time.monotonic()
    with _StopSignals(log) as signals:
        for step in range(start, cfg.steps):
            lr = lr_at(step, lr=cfg.lr, total_steps=cfg.decay_steps or cfg.steps, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr if group["base_lr"] == cfg.lr else group["base_lr"] * lr / cfg.lr
            loss, metrics = _accumulate(forward_model, loss_fn, batches, step, cfg.grad_accum, amp, device)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            log.step_done(loss, lr, metrics)  # device tensors: no host sync until a log, eval or checkpoint
            hook_stop = bool(on_step(done, model, optimizer)) if on_step is not None else False
            is_last = done == cfg.steps or hook_stop or signals.caught is not None
            eval_due = val_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last)
            timed = cfg.save_every_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.save_every_minutes
            save_due = bool(cfg.save_every and done % cfg.save_every == 0) or timed or is_last
            if done % cfg.log_every == 0 or eval_due or save_due:
                log.flush(done)  # raises TrainingDiverged before any checkpoint could store a NaN model
            if eval_due:
                val = evaluate_loss(model, loss_fn, val_batches, cfg.eval_batches, device, cfg.precision)
                log.validation(done, val)
                if cfg.target_loss is not None and val <= cfg.target_loss:
                    log.say(f"reached target validation loss {cfg.target_loss} at step {done}")
                    is_last = save_due = True
            if save_due:
                _save_checkpoint(save, checkpoint_dir, optimizer, cfg, device, done, stateful)
                last_save = time.monotonic()
                log.restart_clock()
            if signals.caught is not None:
                log.close()
                raise TrainingInterrupted(signals.caught, done, checkpoint_dir)
            if is_last:
                break
    log.close()
    return TrainResult(step=start + len(log.losses), losses=log.losses, val_losses=log.val_losses,
                       checkpoint=checkpoint_dir, seconds=log.seconds())


def _accumulate(model: nn.Module, loss_fn: LossFn, batches: BatchFn, step: int, grad_accum: int,
                amp: contextlib.AbstractContextManager, device: torch.device) -> tuple[torch.Tensor, Metrics]:
    """Forward and backward over one step's micro-batches; the step's mean loss and mean named metrics."""
    loss = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    for micro in range(grad_accum):
        batch = _to(batches(step * grad_accum + micro), device)  # outside autocast: rollouts decode as they like
        with amp:
            micro_loss, micro_metrics = split_loss(loss_fn(model, batch))
        (micro_loss / grad_accum).backward()
        loss += micro_loss.detach() / grad_accum
        for name, value in micro_metrics.items():
            share = torch.as_tensor(value, dtype=torch.float32).detach().to(device) / grad_accum
            metrics[name] = metrics[name] + share if name in metrics else share
    return loss, metrics


def split_loss(output: torch.Tensor | tuple[torch.Tensor, Metrics]) -> tuple[torch.Tensor, Metrics]:
    """A loss_fn returns a loss, or (loss, named metrics to log)."""
    return output if isinstance(output, tuple) else (output, {})


class _StopSignals:
    """While training, Ctrl-C and SIGTERM only raise a flag; the loop finishes its step, checkpoints and stops.
    A second Ctrl-C stops at once, without saving. Handlers can only be set from the main thread."""

    def __init__(self, log: _Log) -> None:
        self.log, self.caught, self.previous = log, None, {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.caught is not None:
            raise KeyboardInterrupt
        self.caught = number
        self.log.say(f"{signal.Signals(number).name}: finishing this step, then saving a checkpoint "
                     "(Ctrl-C again stops at once, without saving)")

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def _save_checkpoint(save: Callable[[Path, dict, dict], None], folder: Path | None,
                     optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device, step: int,
                     stateful: dict[str, Any]) -> None:
    if folder is None:
        return
    opt_tensors, opt_groups = optimizer_tensors(optimizer)
    rng = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(device)
    state = {"step": step, "data_position": step * cfg.grad_accum, "train_config": asdict(cfg),
             "optimizer": opt_groups}
    extra_tensors: dict[str, torch.Tensor] = {}
    for name, obj in stateful.items():  # tensors go to safetensors, everything else to the JSON
        values = obj.state_dict()
        extra_tensors |= {f"{name}.{k}": v.detach().contiguous().cpu() for k, v in values.items()
                          if isinstance(v, torch.Tensor)}
        state.setdefault("stateful", {})[name] = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    save(folder, state, {**opt_tensors, **rng, **extra_tensors})


def _restore_stateful(stateful: dict[str, Any], state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    for name, obj in stateful.items():
        values = dict(state.get("stateful", {}).get(name, {}))
        values |= {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        obj.load_state_dict(values)


class _Log:
    """Losses, throughput, MFU, metrics.jsonl and the progress bar of one run."""

    def __init__(self, out_dir: Path | None, start: int, cfg: TrainConfig, tokens_per_step: int | None,
                 flops_per_token: float | None, device: torch.device, checkpoint_dir: Path | None) -> None:
        self.metrics = _Metrics(out_dir, start)
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops(device) if flops_per_token else None
        self.checkpoint_dir = checkpoint_dir
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, dynamic_ncols=True, unit="step")
        self.losses: list[float] = []
        self.val_losses: list[tuple[int, float]] = []
        self.pending: list[tuple[torch.Tensor, float, Metrics]] = []
        self.began = self.window_start = time.perf_counter()
        self.window_steps = 0

    def step_done(self, loss: torch.Tensor, lr: float, metrics: Metrics) -> None:
        self.pending.append((loss, lr, metrics))
        self.window_steps += 1
        self.bar.update(1)

    def flush(self, step: int) -> None:
        """Bring pending losses to the host, stop on the first non-finite one, write a metrics line."""
        if not self.pending:
            return
        values = torch.stack([loss for loss, _, _ in self.pending]).tolist()
        first = step - len(values)
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                self.close()
                kept = (f"the last good checkpoint in {self.checkpoint_dir} is kept" if self.checkpoint_dir
                        else "nothing was saved")
                raise TrainingDiverged(f"loss became {value} at step {first + offset}; {kept}; "
                                       "lower --train.lr or raise --train.warmup_steps")
        self.losses.extend(values)
        lr = self.pending[-1][1]
        record: dict[str, Any] = {"step": step, "loss": round(values[-1], 5), "lr": lr, "elapsed_s": self._elapsed()}
        record |= self._mean_metrics()
        self.pending.clear()
        if self.tokens_per_step:
            tps = self.tokens_per_step * self.window_steps / (time.perf_counter() - self.window_start)
            record["tokens_per_s"] = round(tps, 1)
            if self.flops_per_token and self.peak:
                record["mfu"] = round(self.flops_per_token * tps / self.peak, 4)
        self.metrics.write(record)
        self.bar.set_postfix({k: record[k] for k in ("loss", "tokens_per_s", "mfu") if k in record})
        self.restart_clock()

    def _mean_metrics(self) -> dict[str, float]:
        """Each loss_fn metric averaged over the steps since the last line."""
        names = {name for _, _, metrics in self.pending for name in metrics}
        means = {}
        for name in sorted(names):
            values = [metrics[name] for _, _, metrics in self.pending if name in metrics]
            means[name] = round(float(torch.stack([torch.as_tensor(v) for v in values]).float().mean()), 6)
        return means

    def validation(self, step: int, val: float) -> None:
        self.val_losses.append((step, val))
        ppl = math.exp(min(val, 50))
        self.metrics.write({"step": step, "val_loss": round(val, 5), "val_ppl": round(ppl, 3),
                            "elapsed_s": self._elapsed()})
        self.say(f"step {step}: val loss {val:.4f}, perplexity {ppl:.2f}")
        self.restart_clock()  # keep evaluation out of the throughput numbers

    def say(self, message: str) -> None:
        if not self.bar.disable:
            self.bar.write(message)

    def restart_clock(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def _elapsed(self) -> float:
        return round(self.seconds(), 3)

    def seconds(self) -> float:
        return time.perf_counter() - self.began

    def close(self) -> None:
        self.bar.close()


def _resume(out_dir: Path | None, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
            device: torch.device, restore: Callable[[Path], None] | None, stateful: dict[str, Any]) -> int:
    if out_dir is None:
        raise UserError("--resume needs an output folder holding a checkpoint")
    folder = out_dir / CHECKPOINT_DIR
    state, tensors = read_trainer_state(folder)
    if restore is not None:
        restore(folder)
    else:
        load_model_tensors(model, load_file(str(folder / WEIGHTS_FILE)), str(folder))
    restore_optimizer(optimizer, tensors, state["optimizer"])  # moves state onto the params' device
    _restore_stateful(stateful, state, tensors)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    step = int(state["step"])
    if step >= cfg.steps:
        raise UserError(f"the checkpoint is already at step {step} >= train.steps={cfg.steps}; raise --train.steps")
    return step
