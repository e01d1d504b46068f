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

Under torchrun, `cfg.distributed` runs the same loop data-parallel (`lmforge.train.distributed`: DDP, ZeRO-1, FSDP2
as ZeRO-2/3): rank r trains on micro-batches (step*grad_accum + micro)*world + r, losses and stop decisions are
agreed across ranks, and only rank 0 logs and writes files other than the sharded checkpoint.
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
from lmforge.train import distributed
from lmforge.train.checkpoint import (
    STATE_FILE,
    read_trainer_state,
    restore_optimizer,
    save_checkpoint,
    state_tensors,
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
    distributed: str = field(default="none", metadata={
        "help": "none | ddp | zero1 | zero2 | zero3 | fsdp, under torchrun: ddp = full replicas; zero1 = DDP + "
                "ZeroRedundancyOptimizer (optimizer state sharded); zero2 = FSDP2 fully_shard per block with "
                "reshard_after_forward=False (+ gradients sharded); zero3 = fsdp = reshard_after_forward=True "
                "(+ weights sharded). Launch: torchrun --standalone --nproc_per_node N -m lmforge.cli ..."})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each transformer block's activations in backward instead of storing them "
                "(less memory, about one more forward of compute)"})

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
        distributed.check_mode(self.distributed)  # before any data work: e.g. how to launch a distributed run


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
                  precision: str = "auto", dist: distributed.Dist | None = None) -> float:
    """Mean loss over batches(0..n_batches-1). Under `dist` each rank takes every world-th batch and the sums
    are added up; every rank runs the same number of forwards (a sharded model gathers weights in each)."""
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    was_training = model.training
    model.eval()
    total = 0.0
    with autocast_for(device, precision):
        for k in range(math.ceil(n_batches / world)):
            index = k * world + rank
            loss = split_loss(loss_fn(model, _to(batches(min(index, n_batches - 1)), device)))[0]
            total += loss.item() if index < n_batches else 0.0
    model.train(was_training)
    if dist is not None and dist.active:
        total = dist.sum(torch.tensor(total, dtype=torch.float64, device=device)).item()
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
    d = distributed.setup(cfg.distributed, cfg.device)
    device = d.device
    model.to(device).train()
    use_activation_checkpointing(model, cfg.activation_checkpointing)
    torch.manual_seed(cfg.seed + d.rank)  # dropout differs across ranks; rank 0 draws what one process would
    optimizer = optimizer or make_adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    save = save or (lambda folder, state, tensors: save_checkpoint(folder, model, None, state, tensors))
    stateful = {name: obj for name, obj in (("batches", batches), ("on_step", on_step)) if hasattr(obj, "state_dict")}
    # Under FSDP with a sharded copy of the same step, each rank reads only its shards, after sharding.
    sharded = resume and restore is None and _sharded_copy_fits(out_dir, d)
    start = _resume(out_dir, model, optimizer, cfg, d, restore, stateful, weights=not sharded) if resume else 0
    amp = autocast_for(device, cfg.precision)
    wrapped, optimizer = distributed.wrap(model, optimizer, d, getattr(amp, "fast_dtype", None))
    if sharded:
        distributed.load_sharded(out_dir, model, optimizer)
    forward_model = torch.compile(wrapped) if cfg.compile else wrapped
    checkpoint_dir = out_dir / CHECKPOINT_DIR if out_dir else None
    log = _Log(out_dir if d.is_main else None, start, cfg, tokens_per_step, flops_per_token, device, checkpoint_dir,
               world=d.world, show=d.is_main)
    last_save = time.monotonic()
    with _StopSignals(log) as signals:
        for step in range(start, cfg.steps):
            lr = lr_at(step, lr=cfg.lr, total_steps=cfg.decay_steps or cfg.steps, warmup_steps=cfg.warmup_steps,
                       min_lr_ratio=cfg.min_lr_ratio, schedule=cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr if group["base_lr"] == cfg.lr else group["base_lr"] * lr / cfg.lr
            loss, metrics = _accumulate(forward_model, loss_fn, batches, step, cfg.grad_accum, amp, device, d)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            hook_stop = bool(on_step(done, model, optimizer)) if on_step is not None else False
            timed = cfg.save_every_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.save_every_minutes
            loss, metrics, hook_stop, timed = _agree(d, loss, metrics, hook_stop, timed, signals)
            log.step_done(loss, lr, metrics)  # device tensors: no host sync until a log, eval or checkpoint
            is_last = done == cfg.steps or hook_stop or signals.caught is not None
            eval_due = val_batches is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last)
            save_due = bool(cfg.save_every and done % cfg.save_every == 0) or timed or is_last
            if done % cfg.log_every == 0 or eval_due or save_due:
                log.flush(done)  # raises TrainingDiverged before any checkpoint could store a NaN model
            if eval_due:
                val = evaluate_loss(model, loss_fn, val_batches, cfg.eval_batches, device, cfg.precision, d)
                log.validation(done, val)
                if cfg.target_loss is not None and val <= cfg.target_loss:
                    log.say(f"reached target validation loss {cfg.target_loss} at step {done}")
                    is_last = save_due = True
            if save_due:
                _save_checkpoint(save, checkpoint_dir, model, optimizer, cfg, d, done, stateful)
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
                amp: contextlib.AbstractContextManager, device: torch.device, d: distributed.Dist
                ) -> tuple[torch.Tensor, Metrics]:
    """Forward and backward over one step's micro-batches; the step's mean loss and mean named metrics.
    Gradients are reduced across ranks only in the last micro-batch's backward."""
    loss = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    for micro in range(grad_accum):
        # outside autocast: rollouts decode as they like
        batch = _to(batches(distributed.micro_index(step, micro, grad_accum, d)), device)
        with distributed.sync_gradients(model, d, last_micro=micro == grad_accum - 1):
            with amp:
                micro_loss, micro_metrics = split_loss(loss_fn(model, batch))
            (micro_loss / grad_accum).backward()
        loss += micro_loss.detach() / grad_accum
        for name, value in micro_metrics.items():
            share = torch.as_tensor(value, dtype=torch.float32).detach().to(device) / grad_accum
            metrics[name] = metrics[name] + share if name in metrics else share
    return loss, metrics


def _agree(d: distributed.Dist, loss: torch.Tensor, metrics: Metrics, hook_stop: bool, timed: bool,
           signals: _StopSignals) -> tuple[torch.Tensor, Metrics, bool, bool]:
    """One all-reduce per step: the loss and metrics averaged over ranks (what one process would log), and the
    decisions every rank must share or a collective save deadlocks: a hook's stop, a caught signal, and the
    time-based save, which rank 0's clock alone decides."""
    if not d.active:
        return loss, metrics, hook_stop, timed
    names = sorted(metrics)
    flags = [float(hook_stop), float(signals.caught is not None), float(timed and d.is_main)]
    values = [loss.float(), *(torch.as_tensor(metrics[n]).float().to(loss.device) for n in names)]
    summed = d.sum(torch.cat([torch.stack(values), torch.tensor(flags, device=loss.device)]))
    mean = summed[:len(values)] / d.world
    hook_stop, caught, timed = (bool(v > 0) for v in summed[len(values):].tolist())
    if caught and signals.caught is None:  # another rank was signalled: stop with it, at the same step
        signals.caught = signal.SIGTERM
    return mean[0], dict(zip(names, mean[1:], strict=True)), hook_stop, timed


def use_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn on per-block recomputation in every transformer stack that offers it (`TransformerStack`)."""
    if not enabled:
        return
    stacks = [module for module in model.modules() if hasattr(module, "activation_checkpointing")]
    if not stacks:
        raise UserError(f"--train.activation_checkpointing recomputes transformer blocks, and this "
                        f"{type(model).__name__} has none; drop the option")
    for module in stacks:
        module.activation_checkpointing = True


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


def _save_checkpoint(save: Callable[[Path, dict, dict], None], folder: Path | None, model: nn.Module,
                     optimizer: torch.optim.Optimizer, cfg: TrainConfig, d: distributed.Dist, step: int,
                     stateful: dict[str, Any]) -> None:
    """Write the checkpoint; under torchrun every rank takes part (sharded copy, gathers), rank 0 writes the
    consolidated folder, and all wait for it."""
    if folder is None:
        return
    if d.active:
        distributed.save_sharded(folder.parent, model, optimizer, d, step)
    full_optimizer = distributed.full_optimizer_state(optimizer, d)
    full_model = distributed.full_model_state(model, d)
    if d.is_main:
        with distributed.full_weights_view(model, full_model):
            _save_consolidated(save, folder, full_optimizer, cfg, d, step, stateful)
    d.barrier()


def _save_consolidated(save: Callable[[Path, dict, dict], None], folder: Path, optimizer_state: dict,
                       cfg: TrainConfig, d: distributed.Dist, step: int, stateful: dict[str, Any]) -> None:
    device = d.device
    opt_tensors, opt_groups = state_tensors(optimizer_state)
    rng = {"rng.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["rng.cuda"] = torch.cuda.get_rng_state(device)
    state = {"step": step, "data_position": step * cfg.grad_accum * d.world, "world_size": d.world,
             "train_config": asdict(cfg), "optimizer": opt_groups}
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
                 flops_per_token: float | None, device: torch.device, checkpoint_dir: Path | None,
                 world: int = 1, show: bool = True) -> None:
        self.metrics = _Metrics(out_dir, start)
        # tokens_per_step is one process's; the run's throughput and peak are the world's (log on rank 0 only)
        self.tokens_per_step = tokens_per_step * world if tokens_per_step else tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device) * world if flops_per_token else None
        self.checkpoint_dir = checkpoint_dir
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and show), dynamic_ncols=True,
                        unit="step")
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
            d: distributed.Dist, restore: Callable[[Path], None] | None, stateful: dict[str, Any],
            weights: bool = True) -> int:
    """Restore the consolidated checkpoint into the plain model and optimizer (before any sharding), so a run
    resumes at any world size; weights=False leaves model and optimizer to the sharded copy."""
    if out_dir is None:
        raise UserError("--resume needs an output folder holding a checkpoint")
    device = d.device
    folder = out_dir / CHECKPOINT_DIR
    state, tensors = read_trainer_state(folder)
    _check_same_global_batch(state, cfg, d)
    if restore is not None:
        restore(folder)
    elif weights:
        load_model_tensors(model, load_file(str(folder / WEIGHTS_FILE)), str(folder))
    if weights:
        restore_optimizer(optimizer, tensors, state["optimizer"])  # moves state onto the params' device
    _restore_stateful(stateful, state, tensors)
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    step = int(state["step"])
    if step >= cfg.steps:
        raise UserError(f"the checkpoint is already at step {step} >= train.steps={cfg.steps}; raise --train.steps")
    return step


def _sharded_copy_fits(out_dir: Path | None, d: distributed.Dist) -> bool:
    """Whether out_dir's sharded copy holds the consolidated checkpoint's step (a crash between the two writes
    leaves them apart; the consolidated one is then read)."""
    step = distributed.sharded_step(out_dir, d)
    state_file = out_dir / CHECKPOINT_DIR / STATE_FILE if out_dir is not None else None
    if step is None or state_file is None or not state_file.is_file():
        return False
    return json.loads(state_file.read_text()).get("step") == step


def _check_same_global_batch(state: dict[str, Any], cfg: TrainConfig, d: distributed.Dist) -> None:
    """At another world size the data position only carries over when world x grad_accum stays the same."""
    saved_world = int(state.get("world_size", 1))
    saved = saved_world * int(state.get("train_config", {}).get("grad_accum", cfg.grad_accum))
    if saved_world == d.world or saved == d.world * cfg.grad_accum:
        return
    fix = (f"pass --train.grad_accum {saved // d.world}" if saved % d.world == 0
           else f"use a number of processes that divides {saved}")
    raise UserError(f"the checkpoint took {saved} micro-batches per step ({saved_world} processes x grad_accum "
                    f"{saved // saved_world}) and {d.world} processes x train.grad_accum={cfg.grad_accum} take "
                    f"{d.world * cfg.grad_accum}; {fix} to resume it exactly")
