"""One entry point per job: `apply_method` (which parameters train, how the forward changes),
`save_method_state` / `load_method_state` (only the trained tensors + a small JSON), `merge`."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmforge.checkpoint import load_model_tensors, model_tensors, read_safetensors, write_atomically
from lmforge.compress.quant import block_linears, quantize_layers
from lmforge.errors import UserError
from lmforge.files import read_json_object
from lmforge.models import Model
from lmforge.peft.adapters import apply_adapters, apply_bitfit, apply_selective
from lmforge.peft.core import (
    as_list,
    clear_method,
    freeze,
    method_of,
    record_method,
    require_fresh,
    trainable_tensors,
    unfreeze,
)
from lmforge.peft.lora import LoraConfig, add_loras, apply_lora, merge_lora, select_sites
from lmforge.peft.prefix import apply_prefix_tuning
from lmforge.peft.prompt import apply_prompt_tuning
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import save_checkpoint, save_trainer_state

STATE_CONFIG = "method.json"
STATE_WEIGHTS = "method.safetensors"
FORMAT = "lmforge-peft/1"
INIT_ONLY = ("seed", "init_ids")  # options that choose initial values only


def apply_full(model: nn.Module) -> nn.Module:
    """Full fine-tuning: every parameter trains (the baseline the other methods are measured against)."""
    require_fresh(model, "full")
    for p in model.parameters():
        p.requires_grad_(True)
    record_method(model, "full", {})
    return model


def apply_qlora(model: nn.Module, block_size: int = 64, double_quant: bool = True, **lora_options: Any) -> nn.Module:
    """QLoRA: the block linears become frozen NF4 weights, LoRA updates (full precision) train on top. A base
    that is already quantized (an int4, GPTQ, int8 or NF4 checkpoint) keeps its layers as they are: LoRA wraps
    any quantized linear, and block_size/double_quant then have no effect."""
    cfg = LoraConfig(**lora_options)
    require_fresh(model, "qlora")
    select_sites(model, cfg)  # validate before changing anything
    freeze(model)
    quantize_layers(model, block_linears(model), "nf4", block_size=block_size, double_quant=double_quant)
    add_loras(model, cfg)
    record_method(model, "qlora", {**cfg.options(), "block_size": block_size, "double_quant": double_quant})
    return model


def _apply_lora(model: nn.Module, **options: Any) -> nn.Module:
    return apply_lora(model, LoraConfig(**options))


METHODS: dict[str, Callable[..., nn.Module]] = {
    "full": apply_full, "lora": _apply_lora, "qlora": apply_qlora, "prompt": apply_prompt_tuning,
    "prefix": apply_prefix_tuning, "adapter": apply_adapters, "bitfit": apply_bitfit, "selective": apply_selective,
}


def method_options(method: str) -> list[str]:
    """The options `apply_method(model, method, ...)` accepts (plus `unfreeze`, which every method takes)."""
    fn = METHODS[method]
    names = [p for p in inspect.signature(fn).parameters if p != "model" and p != "lora_options"]
    lora = list(LoraConfig.__dataclass_fields__) if method in ("lora", "qlora") else []
    return [*names, *lora, "unfreeze"]


def apply_method(model: nn.Module, method: str, **options: Any) -> nn.Module:
    """Prepare `model` for fine-tuning with one method: full | lora | qlora | prompt | prefix | adapter |
    bitfit | selective. `unfreeze=[patterns]` trains those parameters too (e.g. a classifier head)."""
    if method not in METHODS:
        raise UserError(f"fine-tuning method '{method}' is unknown; choose one of: {', '.join(METHODS)}")
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(f"method '{method}' has no option(s) {unknown}; its options: {', '.join(allowed)}")
    extra = as_list(options.pop("unfreeze", None))
    METHODS[method](model, **options)
    if extra:
        unfreeze(model, extra)
        record_method(model, method, {**method_of(model)["options"], "unfreeze": extra})
    return model


def with_method(model: Model, method: str, options: dict[str, Any], head_trains: bool = False) -> Model:
    """Apply a method with the options a user set (None = unset, the method's default); 'full' leaves the
    model as it is. head_trains: a classifier's new pooler and head train under every method."""
    chosen = {k: v for k, v in options.items() if v is not None}
    allowed = method_options(method)
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:  # checked for 'full' too: a --peft.r given with it would otherwise be silently ignored
        raise UserError(f"--peft.{unknown[0]} does not apply to method '{method}'; its options: {', '.join(allowed)}")
    if method == "full":
        return model
    if head_trains:
        chosen["unfreeze"] = [*chosen.get("unfreeze", []), "classifier", "pooler"]
    return apply_method(model, method, **chosen)


def method_saver(model: Model, tokenizer: Tokenizer | None) -> Callable[[Path, dict, dict], None]:
    """The training loop's `save`: a whole checkpoint under full fine-tuning (or no method), else only what
    trained plus the tokenizer and trainer state, in one atomically written folder."""
    method = method_of(model)
    if method is None or method["method"] == "full":
        return lambda folder, state, tensors: save_checkpoint(folder, model, tokenizer, state, tensors)

    def save(folder: Path, state: dict, tensors: dict) -> None:
        def tokenizer_and_trainer_state(tmp: Path) -> None:
            if tokenizer is not None:
                tokenizer.save(tmp)
            save_trainer_state(tmp, state, tensors)

        save_method_state(folder, model, also=tokenizer_and_trainer_state)

    return save


def method_restorer(model: Model) -> Callable[[Path], None] | None:
    """The training loop's `restore` on resume: a PEFT checkpoint's tensors onto the base (None under full
    fine-tuning: the loop's default reads the whole weights)."""
    method = method_of(model)
    if method is None or method["method"] == "full":
        return None
    return lambda folder: load_method_state(model, folder)


def save_method_state(folder: str | Path, model: nn.Module, also: Callable[[Path], None] | None = None) -> None:
    """Write method.json (method, options, base config) and method.safetensors (the trainable tensors
    only: a LoRA, a soft prompt, prefixes, adapters; everything for 'full'); also(tmp) adds files of the
    caller's (tokenizer, trainer state) to the same atomically written folder."""
    method = method_of(model)
    if method is None:
        raise UserError("the model has no fine-tuning method applied; call apply_method first")
    tensors = model_tensors(model) if method["method"] == "full" else trainable_tensors(model)
    spec = {"format": FORMAT, **method, "model": model.cfg.to_dict()}

    def write(tmp: Path) -> None:
        (tmp / STATE_CONFIG).write_text(json.dumps(spec, indent=1) + "\n")
        save_file(tensors, str(tmp / STATE_WEIGHTS), metadata={"format": "pt"})
        if also is not None:
            also(tmp)

    write_atomically(Path(folder), write)


def load_method_state(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply the saved method to a base model (unless it already has that method, e.g. to swap one soft
    prompt for another) and load its tensors."""
    folder = Path(folder)
    if not (folder / STATE_CONFIG).is_file() or not (folder / STATE_WEIGHTS).is_file():
        raise UserError(f"'{folder}' is not a method-state folder (needs {STATE_CONFIG} and {STATE_WEIGHTS})")
    spec = read_json_object(folder / STATE_CONFIG, "method state", "save the fine-tune's checkpoint again")
    if not isinstance(spec.get("method"), str) or not isinstance(spec.get("options"), dict):
        raise UserError(f"method state '{folder / STATE_CONFIG}' needs a method name and an options object; "
                        "save the fine-tune's checkpoint again")
    wanted = {"method": spec["method"], "options": spec["options"]}
    current = method_of(model)
    if current is None:
        apply_method(model, spec["method"], **spec["options"])
    elif _structure(current) != _structure(wanted):
        raise UserError(f"the model has method {current} applied but '{folder}' holds {wanted}; load it onto a "
                        "fresh base model")
    record_method(model, spec["method"], spec["options"])
    tensors = read_safetensors(folder / STATE_WEIGHTS)
    if spec["method"] == "full":
        load_model_tensors(model, tensors, str(folder))
    else:
        _load_trainable(model, tensors, folder)
    return model


def _structure(method: dict[str, Any]) -> dict[str, Any]:
    """A method record without the options that only pick starting values (they don't change the shapes)."""
    return {**method, "options": {k: v for k, v in method["options"].items() if k not in INIT_ONLY}}


@torch.no_grad()
def _load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise UserError(f"the tensors in '{folder}' do not fit the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}; load them onto the base model they were trained on")
    for name, tensor in tensors.items():
        if tensor.shape != params[name].shape:
            raise UserError(f"'{name}' in '{folder}' has shape {tuple(tensor.shape)}, the model "
                            f"{tuple(params[name].shape)}; load it onto the base model it was trained on")
        params[name].copy_(tensor)


def merge(model: nn.Module) -> nn.Module:
    """Fold the method into plain weights: LoRA/QLoRA updates are merged (a 4-bit base de-quantized);
    full, BitFit and selective fine-tuning already are plain weights. Returns the plain model."""
    method = method_of(model)
    name = method["method"] if method else None
    if name in ("lora", "qlora"):
        return merge_lora(model)
    if name in ("full", "bitfit", "selective"):
        clear_method(model)
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if name is None:
        raise UserError("the model has no fine-tuning method to merge; apply or load one first")
    raise UserError(f"method '{name}' adds modules that cannot be folded into the weights; merge applies to "
                    "lora and qlora (save the method state and load it with the base instead)")
