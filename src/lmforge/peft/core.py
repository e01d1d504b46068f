"""What every method shares: freezing, choosing parameters by name, counting what trains, the method
record a model carries, and measuring peak memory around a step."""

from __future__ import annotations

import contextlib
import fnmatch
import resource
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.nn import TransformerStack

METHOD_ATTR = "peft_method"  # {"method": name, "options": {...}} on a model a method was applied to


class PeftModule(nn.Module):
    """Base of every module a method adds (LoRA updates, soft prompts, prefixes, adapters): what
    `describe` counts as added rather than base parameters. While `disabled` (see `adapters_disabled`)
    the hooks that apply it add nothing."""

    disabled: bool = False


STACK_SLOTS = ("prompt", "prefix")  # the TransformerStack attributes a soft prompt / prefix tuning fills


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base: every LoRA update (QLoRA's too) and bottleneck
    adapter adds nothing, soft prompts and prefixes are taken off their stacks. Restored on exit, also after
    an exception. This is how a LoRA policy gets its frozen reference without a second copy of the model."""
    if any(getattr(m, "merged", False) for m in model.modules()):
        raise UserError("the LoRA updates are merged into the weights (merge_lora unload=False), so switching them "
                        "off cannot give the base; call unmerge_lora(model) first")
    added = [m for m in model.modules() if isinstance(m, PeftModule) and not m.disabled]
    slots = [(stack, name, getattr(stack, name)) for stack in model.modules() if isinstance(stack, TransformerStack)
             for name in STACK_SLOTS if getattr(stack, name, None) is not None]
    try:
        for module in added:
            module.disabled = True
        for stack, name, _ in slots:
            setattr(stack, name, None)
        yield model
    finally:
        for module in added:
            module.disabled = False
        for stack, name, module in slots:
            setattr(stack, name, module)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def matches(name: str, pattern: str) -> bool:
    """`pattern` names `name` exactly, as a dotted suffix or prefix, or as an fnmatch glob."""
    return (name == pattern or name.endswith("." + pattern) or name.startswith(pattern + ".")
            or fnmatch.fnmatchcase(name, pattern))


def unfreeze(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Train the parameters whose names match any pattern (e.g. `lm_head`, `decoder.blocks.3`, `*.bias`);
    returns the names. A pattern that matches nothing is a mistake, not a no-op."""
    chosen = []
    for pattern in patterns:
        found = [name for name, p in model.named_parameters(remove_duplicate=False) if matches(name, pattern)]
        if not found:
            raise UserError(f"unfreeze pattern '{pattern}' matches no parameter; use a name such as "
                            f"'{next(iter(dict(model.named_parameters())), '')}', a dotted prefix or a glob")
        for name in found:
            model.get_parameter(name).requires_grad_(True)
        chosen += found
    return chosen


def as_list(value: str | Iterable[str] | None) -> list[str]:
    """A list of names from a list or a comma-separated string (the CLI's form)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return list(value)


def method_of(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, METHOD_ATTR, None)


def record_method(model: nn.Module, method: str, options: dict[str, Any]) -> None:
    setattr(model, METHOD_ATTR, {"method": method, "options": options})


def clear_method(model: nn.Module) -> None:
    if hasattr(model, METHOD_ATTR):
        delattr(model, METHOD_ATTR)


def require_fresh(model: nn.Module, method: str) -> None:
    current = method_of(model)
    if current is not None:
        raise UserError(f"the model already has method '{current['method']}' applied; apply '{method}' to a "
                        "freshly loaded base model")


def remove_hook(module: nn.Module, hook: Callable) -> None:
    """Drop `hook` from the module's forward hooks (found by identity: no handle to keep or copy)."""
    for key in [k for k, fn in module._forward_hooks.items() if fn is hook]:
        del module._forward_hooks[key]


def add_hook(module: nn.Module, hook: Callable) -> None:
    if not any(fn is hook for fn in module._forward_hooks.values()):
        module.register_forward_hook(hook)


# -- counting -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParameterCount:
    """trainable of total parameters; base = the model's own (quantized weights included), without the
    method's added modules, i.e. what full fine-tuning would train."""

    trainable: int
    total: int
    base: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    @property
    def reduction(self) -> float:
        """Fraction fewer parameters to train than full fine-tuning (0.86 = 86% fewer)."""
        return 1.0 - self.trainable / max(self.base, 1)

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.2f}%); "
                f"{self.reduction:.1%} fewer than full fine-tuning ({self.base:,})")


def describe(model: nn.Module) -> ParameterCount:
    """Trainable vs total parameters (a tied head counted once; 4-bit weights count as parameters)."""
    added_ids = {id(p) for m in model.modules() if isinstance(m, PeftModule) for p in m.parameters()}
    params = list(model.parameters())
    quantized = sum(getattr(m, "quantized_parameters", 0) for m in model.modules())
    total = sum(p.numel() for p in params) + quantized
    added = sum(p.numel() for p in params if id(p) in added_ids)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParameterCount(trainable=trainable, total=total, base=total - added)


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter by its first name (a tied head's alias is left out)."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


# -- memory -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeakMemory:
    bytes: int
    source: str  # "cuda" (max allocated), "rss" (peak resident set since reset) or "rss-lifetime"

    def __str__(self) -> str:
        return f"peak memory {self.bytes / 2**20:.1f} MiB ({self.source})"


def measure_peak_memory(step: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, PeakMemory]:
    """Run `step()` and report the peak memory it reached: CUDA's max allocated bytes on a GPU, the
    process's peak RSS on a CPU (reset first where Linux allows, else the lifetime peak)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = step()
        torch.cuda.synchronize(device)
        return result, PeakMemory(torch.cuda.max_memory_allocated(device), "cuda")
    reset = _reset_peak_rss()
    result = step()
    peak = _peak_rss()
    if peak is None:  # not Linux: ru_maxrss is the lifetime peak (KiB on Linux, bytes on macOS)
        scale = 1 if sys.platform == "darwin" else 1024
        return result, PeakMemory(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "rss-lifetime")
    return result, PeakMemory(peak, "rss" if reset else "rss-lifetime")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5 = reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _peak_rss() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
