"""Model folders a user can read: config.json, model.safetensors, tokenizer files. The trainer's half
(trainer_state.json and its tensors) is `lmforge.train.checkpoint`; peft, interop and train build on this one.

Folders are written under a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint where a good one was. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.models import Model, model_class
from lmforge.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
COMPRESSION_FILE = "compression.json"  # written by lmforge.compress.storage, which loads such folders


def alias_names(model: nn.Module) -> set[str]:
    """Names under which an already-named parameter appears again (a tied output head)."""
    seen: set[int] = set()
    aliases = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without aliases (a tied head shares the embedding and is stored once)."""
    aliases = alias_names(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in aliases}


def load_model_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load weights strictly, allowing only the aliases `model_tensors` leaves out.

    assign=True adopts the given tensors as the parameters (no copy), for a model built by
    `Model.for_loading`; never use it on a model an optimizer already holds.
    """
    expected = model.state_dict()
    persistent = {k for k in expected if k not in alias_names(model)}
    missing = sorted(persistent - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"weights in {source} do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"weight '{name}' in {source} has shape {tuple(tensor.shape)}, "
                            f"the model {tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=False, assign=assign)
    if assign and hasattr(model, "tie_weights"):
        model.tie_weights()


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or a UserError naming it (truncated, damaged, not safetensors)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"'{path}' is not a readable safetensors file ({exc}); it is truncated or damaged: save, "
                        "copy or download it again") from None


def write_atomically(folder: str | Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp_folder), then swap tmp_folder into `folder`'s place."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def save_model(folder: Path, model: Model, tokenizer: Tokenizer | None = None) -> None:
    """Write config, weights and tokenizer into an existing folder (see `write_atomically`)."""
    model.cfg.save(folder / CONFIG_FILE)
    save_file(model_tensors(model), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(folder)


def save(folder: str | Path, model: Model, tokenizer: Tokenizer | None = None) -> None:
    """Write a model folder (config, weights, tokenizer) atomically; `load` reads it back."""
    write_atomically(folder, lambda tmp: save_model(tmp, model, tokenizer))


# Checkpoints written before the families landed kept the decoder's parts at the top level.
_V0_PREFIXES = {"blocks.": "decoder.blocks.", "final_norm.": "decoder.final_norm.",
                "learned_positions.": "decoder.positions.learned."}


def _renamed_from_v0(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def rename(name: str) -> str:
        old = next((p for p in _V0_PREFIXES if name.startswith(p)), None)
        return name if old is None else _V0_PREFIXES[old] + name[len(old):]

    return {rename(k): v for k, v in tensors.items()}


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[Model, Tokenizer | None]:
    """Load an lmforge checkpoint folder → (model in eval mode, tokenizer or None)."""
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"'{path}' is not a checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    if (folder / COMPRESSION_FILE).is_file():  # quantized layers this layer cannot build: compress sits above it
        raise UserError(f"'{path}' is a compressed checkpoint; load it with lmforge.load (lmforge.interop.load)")
    cfg = ModelConfig.load(folder / CONFIG_FILE)
    model = model_class(cfg).for_loading(cfg)
    tensors = _renamed_from_v0(read_safetensors(folder / WEIGHTS_FILE))
    load_model_tensors(model, tensors, str(folder / WEIGHTS_FILE), assign=True)
    tokenizer = Tokenizer.load(folder) if (folder / "tokenizer.json").is_file() else None
    return model.to(device).eval(), tokenizer
