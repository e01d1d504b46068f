"""Where tensors live and at what precision: one place for every stage (training, generation, serving)."""

from __future__ import annotations

import contextlib

import torch

from lmforge.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"device '{name}' is not a valid torch device; use auto, cpu, cuda or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{name}' asked for, but CUDA is not available here; use --train.device cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast only where it is fast (CUDA with bf16); CPUs without AMX run it ~20x slower."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)
