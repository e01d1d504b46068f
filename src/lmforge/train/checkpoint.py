"""The trainer's half of a checkpoint folder: trainer_state.json (step, data position, hyper-parameters)
and trainer_state.safetensors (optimizer moments, RNG states), written beside the model files of
`lmforge.checkpoint` in one atomic folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmforge.checkpoint import read_safetensors, save_model, write_atomically
from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.models import Model
from lmforge.tokenizer import Tokenizer

STATE_FILE = "trainer_state.json"
STATE_TENSORS_FILE = "trainer_state.safetensors"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer.state_dict() into tensors (for safetensors) and JSON-able hyper-parameters."""
    return state_tensors(optimizer.state_dict())


def state_tensors(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict (as one process's: index-keyed) into tensors and JSON-able groups."""
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).detach().contiguous().cpu()
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: dict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": state, "param_groups": groups["param_groups"]})


def save_trainer_state(folder: Path, state: dict[str, Any] | None, state_tensors: dict[str, torch.Tensor] | None
                       ) -> None:
    """Write the trainer state (step, data position, hyper-parameters; optimizer moments, RNG) into a folder."""
    if state is not None:
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    if state_tensors:
        save_file(state_tensors, str(folder / STATE_TENSORS_FILE))


def save_checkpoint(folder: str | Path, model: Model, tokenizer: Tokenizer | None = None,
                    state: dict[str, Any] | None = None, state_tensors: dict[str, torch.Tensor] | None = None) -> None:
    def write(tmp: Path) -> None:
        save_model(tmp, model, tokenizer)
        save_trainer_state(tmp, state, state_tensors)

    write_atomically(Path(folder), write)


def read_trainer_state(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise UserError(f"'{folder}' has no {STATE_FILE} to resume from; start without --resume")
    tensors = read_safetensors(folder / STATE_TENSORS_FILE) if (folder / STATE_TENSORS_FILE).is_file() else {}
    return read_json_object(folder / STATE_FILE, "trainer state", "resume from an intact checkpoint"), tensors


