"""What tests/test_distributed.py launches once under torchrun (2 processes, gloo): trains the same tiny model
with every sharding mode, resumes runs saved at world size 2, and runs `lmforge pretrain` end to end, so that the
test compares all of it against one process. Also imported by the test for the shared model and data.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT CORPUS
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.config import ModelConfig
from lmforge.errors import TrainingInterrupted, UserError
from lmforge.models import CausalLM
from lmforge.train import TrainConfig, train

MODES = ("ddp", "zero1", "zero2", "zero3")
RESUMED = ("zero1", "zero3")  # the two modes that reshape optimizer state when it is restored
STEPS, HALF, BATCH, SEQ = 4, 2, 2, 16


def tiny_model() -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig.from_preset("tiny", tie_embeddings=False))


def batches(index: int) -> dict[str, torch.Tensor]:
    """Micro-batch `index`: a pure function of the index, as the loop requires."""
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(index))
    return {"input_ids": ids, "labels": ids}


def config(mode: str, grad_accum: int, optimizer: str, steps: int = STEPS) -> TrainConfig:
    # AdamW with clipping that bites checks clip_grad_norm_ over shards and sharded moments; but both normalise a
    # wrong gradient scale away, so plain SGD with momentum (no clipping) is what checks the scale.
    clip = 0.5 if optimizer == "adamw" else 0.0
    return TrainConfig(steps=steps, batch_size=BATCH, grad_accum=grad_accum, lr=3e-3 if clip else 0.1,
                       warmup_steps=1, decay_steps=STEPS, grad_clip=clip, eval_every=0, eval_batches=3, log_every=1,
                       save_every_minutes=0, device="cpu", progress=False, distributed=mode)


def run(mode: str, out: Path, grad_accum: int, optimizer: str = "adamw", steps: int = STEPS,
        resume: bool = False) -> list[float]:
    """Train the tiny model; validation over 3 batches (not divisible by the world size) ends the run.
    The losses of the steps, then the validation loss."""
    cfg = config(mode, grad_accum, optimizer, steps)
    model = tiny_model()
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9) if optimizer == "sgd" else None
    result = train(model, batches, cfg, val_batches=lambda i: batches(10_000 + i), out_dir=out, resume=resume,
                   optimizer=sgd)
    return [*result.losses, result.val_losses[-1][1]]


def interrupted_run(out: Path) -> int | None:
    """SIGTERM reaches rank 1 alone after step 2: both ranks must stop after that step, saving together.
    The step rank 0 stopped at (None if it did not stop)."""
    import torch.distributed as dist

    def signal_rank_1(step: int, model: object, optimizer: object) -> None:
        if step == HALF and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        train(tiny_model(), batches, config("ddp", 1, "adamw"), out_dir=out, on_step=signal_rank_1)
    except TrainingInterrupted as stop:
        return stop.step
    return None


def failing_batches(index: int) -> dict[str, torch.Tensor]:
    if index % 2 == 1 and index >= 2:  # rank 1's micro-batches from the second step on
        raise UserError("micro-batch 3 is broken on rank 1")
    return batches(index)


def main(out: Path, corpus: Path) -> None:
    import torch.distributed as dist

    per_rank_accum = 2
    results = {}
    for mode in MODES:
        results[mode] = run(mode, out / mode, per_rank_accum)
        results[f"sgd-{mode}"] = run(mode, out / f"sgd-{mode}", per_rank_accum, "sgd")
    for mode in RESUMED:
        run(mode, out / f"resume-{mode}", per_rank_accum, steps=HALF)
        if dist.get_rank() == 0:
            shutil.copytree(out / f"resume-{mode}", out / f"half-{mode}")
            if mode in ("zero2", "zero3"):  # zero the consolidated weights: resuming FSDP must read the DCP shards
                weights = out / f"resume-{mode}" / "checkpoint" / "model.safetensors"
                save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)
        dist.barrier()
        results[f"resume-{mode}"] = run(mode, out / f"resume-{mode}", per_rank_accum, resume=True)
    results["interrupted"] = interrupted_run(out / "interrupted")
    from lmforge.cli import main as cli

    code = cli(["pretrain", "--out_dir", str(out / "cli"), "--data.sources", str(corpus), "--data.val_fraction",
                "0.2", "--tokenizer.kind", "char", "--model.preset", "tiny", "--model.context_length", "32",
                "--train.steps", "3", "--train.batch_size", "4", "--train.eval_batches", "3", "--train.progress",
                "false", "--train.distributed", "ddp", "--train.device", "cpu"])
    results["cli"] = code
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))
    # Last: one rank fails; the CLI prints its one-line error and exits 2, and torchrun must stop the other rank
    # (blocked in a collective) instead of letting it hang.
    try:
        train(tiny_model(), failing_batches, config("ddp", 1, "adamw"), out_dir=out / "failing")
    except UserError as exc:
        sys.stderr.write(f"lmforge: error: {exc}\n")
        sys.exit(2)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
