"""What tests/test_distributed.py launches once under torchrun (2 processes, gloo): trains the same tiny model
with every sharding mode, resumes runs saved at world size 2, and runs `lmforge pretrain` end to end, so that the
test compares all of it against one process. Also imported by the test for the shared model and data.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py OUT CORPUS
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from lmforge.config import ModelConfig
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


def config(mode: str, grad_accum: int, steps: int = STEPS) -> TrainConfig:
    # lr high enough that a wrong gradient scale shows; clipping on, so clip_grad_norm_ over shards is checked too
    return TrainConfig(steps=steps, batch_size=BATCH, grad_accum=grad_accum, lr=3e-3, warmup_steps=1,
                       decay_steps=STEPS, grad_clip=0.5, eval_every=0, eval_batches=3, log_every=1,
                       save_every_minutes=0, device="cpu", progress=False, distributed=mode)


def run(mode: str, out: Path, grad_accum: int, steps: int = STEPS, resume: bool = False) -> list[float]:
    """Train the tiny model; validation over 3 batches (not divisible by the world size) ends the run."""
    result = train(tiny_model(), batches, config(mode, grad_accum, steps), val_batches=lambda i: batches(10_000 + i),
                   out_dir=out, resume=resume)
    return [*result.losses, result.val_losses[-1][1]]


def main(out: Path, corpus: Path) -> None:
    import torch.distributed as dist

    per_rank_accum = 2
    results = {}
    for mode in MODES:
        results[mode] = run(mode, out / mode, per_rank_accum)
    for mode in RESUMED:
        run(mode, out / f"resume-{mode}", per_rank_accum, steps=HALF)
        if dist.get_rank() == 0:
            shutil.copytree(out / f"resume-{mode}", out / f"half-{mode}")
        dist.barrier()
        results[f"resume-{mode}"] = run(mode, out / f"resume-{mode}", per_rank_accum, resume=True)
    from lmforge.cli import main as cli

    code = cli(["pretrain", "--out_dir", str(out / "cli"), "--data.sources", str(corpus), "--data.val_fraction",
                "0.2", "--tokenizer.kind", "char", "--model.preset", "tiny", "--model.context_length", "32",
                "--train.steps", "3", "--train.batch_size", "4", "--train.eval_batches", "3", "--train.progress",
                "false", "--train.distributed", "ddp", "--train.device", "cpu"])
    results["cli"] = code
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
