"""The one training loop and what it needs: optimizer, schedule, trainer state for exact resume."""

from lmforge.train.checkpoint import save_checkpoint
from lmforge.train.loop import (
    FAMILY_LOSSES,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    batch_loss,
    clm_loss,
    evaluate_loss,
    mlm_loss,
    train,
)
from lmforge.train.optim import lr_at, make_adamw

__all__ = [
    "FAMILY_LOSSES",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "batch_loss",
    "clm_loss",
    "evaluate_loss",
    "lr_at",
    "make_adamw",
    "mlm_loss",
    "save_checkpoint",
    "train",
]
