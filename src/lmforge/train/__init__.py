"""The one training loop and what it needs: optimizer, schedule, checkpoints, devices."""

from lmforge.train.checkpoint import load, save_checkpoint
from lmforge.train.loop import (
    FAMILY_LOSSES,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    autocast_for,
    batch_loss,
    clm_loss,
    evaluate_loss,
    mlm_loss,
    pick_device,
    train,
)
from lmforge.train.optim import lr_at, make_adamw

__all__ = [
    "FAMILY_LOSSES",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "autocast_for",
    "batch_loss",
    "clm_loss",
    "evaluate_loss",
    "load",
    "lr_at",
    "make_adamw",
    "mlm_loss",
    "pick_device",
    "save_checkpoint",
    "train",
]
