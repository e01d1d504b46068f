"""LoRA (Hu et al. 2021): W x + (alpha/r) B A x with only A (r×in) and B (out×r) trained.

lmforge fuses q/k/v into one `qkv` Linear and gate/up into one `up`, so a LoRA *target* names rows of
a Linear: "q" is the q rows of `attn.qkv`, "gate" the first half of a gated `mlp.up`. Each target gets
its own A/B pair (as peft keeps q_proj, k_proj, v_proj apart); the updates of one Linear live in a
`LoraSet` attached to it as `.lora`, and a forward hook adds them to its output, so the base weights
keep their names and stay bit-identical. A starts kaiming-uniform and B at zero (peft's init), so
the model starts exactly at the base. `merge_lora` folds B A into the weights (zero inference cost).

Targets are matched against site keys such as `decoder.blocks.3.q`: a short name ("q") selects it in
every block, a dotted suffix or glob ("decoder.blocks.3.q", "encoder.*.o") selects some.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.compress.quant import QuantizedLinear, dequantize_model
from lmforge.errors import UserError
from lmforge.nn import Block
from lmforge.peft.core import (
    PeftModule,
    add_hook,
    as_list,
    clear_method,
    freeze,
    record_method,
    remove_hook,
    require_fresh,
)

TARGETS = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "cross_q", "cross_k", "cross_v", "cross_kv", "cross_o")
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down", "cross_q", "cross_k", "cross_v", "cross_o")


@dataclass
class LoraConfig:
    targets: list[str] = field(default_factory=lambda: ["q", "v"], metadata={
        "help": f"projections to adapt: {', '.join(TARGETS)}, 'all' (every linear), or site keys/globs"})
    r: int = field(default=8, metadata={"help": "rank of the update"})
    alpha: float = field(default=16.0, metadata={"help": "the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA branch's input"})
    rslora: bool = field(default=False, metadata={"help": "scale by alpha/sqrt(r) (rank-stabilised LoRA)"})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "target → r overrides"})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "target → alpha overrides"})

    def __post_init__(self) -> None:
        self.targets = as_list(self.targets)
        if not self.targets:
            raise UserError(f"lora targets are empty; name some of: {', '.join(TARGETS)} (or 'all')")
        for name in self.targets:
            if "." not in name and not any(c in name for c in "*?[") and name not in (*TARGETS, "all"):
                raise UserError(f"lora target '{name}' is unknown; choose from {', '.join(TARGETS)}, 'all', "
                                "or a site key such as decoder.blocks.0.q")
        for name, r in {"": self.r, **self.rank_pattern}.items():
            if int(r) < 1:
                raise UserError(f"lora rank r={r}{f' for {name}' if name else ''} must be a positive integer")
        if self.alpha <= 0:
            raise UserError(f"lora alpha={self.alpha} must be positive (the update is scaled by alpha/r)")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora dropout={self.dropout} must be in [0, 1)")

    def options(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Site:
    """One LoRA target in one block: rows start:stop of the Linear at `path`."""

    key: str  # e.g. decoder.blocks.0.q
    path: str  # e.g. decoder.blocks.0.attn.qkv
    target: str
    start: int
    stop: int


def _block_sites(prefix: str, block: Block) -> list[Site]:
    attn = block.attn
    q, kv = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    rows: dict[str, tuple[str, int, int]] = {
        "q": ("attn.qkv", 0, q), "k": ("attn.qkv", q, q + kv), "v": ("attn.qkv", q + kv, q + 2 * kv),
        "qkv": ("attn.qkv", 0, q + 2 * kv), "o": ("attn.out", 0, attn.out.out_features),
        "down": ("mlp.down", 0, block.mlp.down.out_features),
    }
    hidden = block.mlp.down.in_features
    if block.mlp.gated:
        rows |= {"gate": ("mlp.up", 0, hidden), "up": ("mlp.up", hidden, 2 * hidden)}
    else:
        rows["up"] = ("mlp.up", 0, hidden)
    if block.cross_attn is not None:
        cross = block.cross_attn
        rows |= {"cross_q": ("cross_attn.q", 0, q), "cross_k": ("cross_attn.kv", 0, kv),
                 "cross_v": ("cross_attn.kv", kv, 2 * kv), "cross_kv": ("cross_attn.kv", 0, 2 * kv),
                 "cross_o": ("cross_attn.out", 0, cross.out.out_features)}
    return [Site(f"{prefix}.{t}", f"{prefix}.{path}", t, a, b) for t, (path, a, b) in rows.items()]


def lora_sites(model: nn.Module) -> dict[str, Site]:
    """Every place a LoRA target can go, by key."""
    return {s.key: s for name, m in model.named_modules() if isinstance(m, Block) for s in _block_sites(name, m)}


def target_matches(key: str, pattern: str) -> bool:
    return key == pattern or key.endswith("." + pattern) or fnmatch.fnmatchcase(key, pattern)


def pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    return next((value for pattern, value in patterns.items() if target_matches(key, pattern)), default)


def select_sites(model: nn.Module, cfg: LoraConfig) -> list[Site]:
    """The sites cfg.targets name; refuses targets that match nothing and rows adapted twice."""
    sites = lora_sites(model)
    present = {s.target for s in sites.values()}
    targets = [t for name in cfg.targets for t in ((x for x in ALL_LINEAR if x in present) if name == "all"
                                                     else (name,))]
    chosen = {}
    for pattern in targets:
        found = [s for key, s in sites.items() if target_matches(key, pattern)]
        if not found:
            raise UserError(f"lora target '{pattern}' matches no projection of this model; it has: "
                            f"{', '.join(t for t in TARGETS if t in present)}")
        chosen.update((s.key, s) for s in found)
    _check_overlap(list(chosen.values()))
    return list(chosen.values())


def _check_overlap(sites: list[Site]) -> None:
    by_path: dict[str, list[Site]] = {}
    for site in sites:
        by_path.setdefault(site.path, []).append(site)
    for group in by_path.values():
        group.sort(key=lambda s: s.start)
        for a, b in itertools.pairwise(group):
            if b.start < a.stop:
                raise UserError(f"lora targets '{a.target}' and '{b.target}' both adapt rows of {a.path}; "
                                "choose one of them")


# -- modules -------------------------------------------------------------------------------------


class LoraUpdate(PeftModule):
    """scaling · B A x for rows start:stop of the Linear it belongs to."""

    def __init__(self, in_features: int, start: int, stop: int, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.start, self.stop = start, stop
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(stop - start, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's (and peft's) init
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.drop(x).to(self.A.dtype), self.A), self.B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.B @ self.A) * self.scaling

    def extra_repr(self) -> str:
        return f"rows={self.start}:{self.stop}, r={self.A.shape[0]}, scaling={self.scaling:g}"


class _AddLowRank(torch.autograd.Function):
    """y += xa @ b.T in place, with y's gradient passed straight through.

    Adding into the base output costs one pass over it inside the GEMM; an out-of-place add (or, for
    fused rows, slicing and concatenating the output) costs extra full-size passes forward and
    backward, which dominate a LoRA step on a CPU.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(y)
        ctx.save_for_backward(xa, b)
        y.view(-1, y.shape[-1]).addmm_(xa.reshape(-1, xa.shape[-1]), b.t())
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        xa, b = ctx.saved_tensors
        grad2 = grad.reshape(-1, grad.shape[-1])
        grad_xa = (grad2 @ b).view_as(xa) if ctx.needs_input_grad[1] else None
        grad_b = grad2.t() @ xa.reshape(-1, xa.shape[-1]) if ctx.needs_input_grad[2] else None
        return grad, grad_xa, grad_b


class LoraSet(nn.ModuleDict):
    """The LoRA updates of one Linear, by target name; adds them to the Linear's output unless merged.

    All updates of a Linear are one low-rank product: xa = x @ [A_1; A_2; ...].T (one matmul), then
    y += xa @ B.T with B block-structured (update i's scaled B_i in its rows and its rank columns,
    zeros elsewhere), added in place (see `_AddLowRank`)."""

    merged: bool = False

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        updates = sorted((u for u in self.values() if not u.disabled), key=lambda u: u.start)
        dtype = updates[0].A.dtype
        if any(isinstance(u.drop, nn.Dropout) and u.drop.training for u in updates):
            # Each update draws its own dropout mask (as peft's per-module dropout), so one x @ A_cat won't do.
            xa = torch.cat([F.linear(u.drop(x).to(dtype), u.A) for u in updates], dim=-1)
        else:
            a = updates[0].A if len(updates) == 1 else torch.cat([u.A for u in updates])
            xa = F.linear(x.to(dtype), a)
        out = y.shape[-1]
        b = torch.cat([F.pad(u.B * u.scaling, (0, 0, u.start, out - u.stop)) for u in updates], dim=1)
        xa, b = xa.to(y.dtype), b.to(y.dtype)
        if not y.is_contiguous():  # not from F.linear as we know it: no in-place view to add into
            return y + xa @ b.t()
        return _AddLowRank.apply(y, xa, b)


def _lora_hook(linear: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
    lora: LoraSet = linear.lora
    if lora.merged or all(u.disabled for u in lora.values()):  # merged: already in the weight; disabled: the base
        return None
    return lora(args[0], output)


def add_lora(linear: nn.Module, target: str, start: int, stop: int, r: int, alpha: float, dropout: float = 0.0,
             rslora: bool = False) -> LoraUpdate:
    """Attach one LoRA update (rows start:stop) to an nn.Linear or QuantizedLinear."""
    if not hasattr(linear, "lora"):
        linear.lora = LoraSet()
        add_hook(linear, _lora_hook)
    # A quantized base (any format) computes in float32: its forward de-quantizes to the input's dtype.
    if isinstance(linear, QuantizedLinear):
        device, dtype = linear.device, torch.float32
    else:
        device, dtype = linear.weight.device, linear.weight.dtype
    update = LoraUpdate(linear.in_features, start, stop, r, alpha, dropout, rslora, device, dtype)
    linear.lora[target] = update
    return update


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, linear) of every Linear carrying LoRA updates."""
    return ((name, m) for name, m in list(model.named_modules()) if isinstance(getattr(m, "lora", None), LoraSet))


def add_loras(model: nn.Module, cfg: LoraConfig) -> list[Site]:
    """Attach cfg's updates to the sites it names (nothing frozen, no method recorded)."""
    sites = select_sites(model, cfg)
    for site in sites:
        r = int(pattern_value(cfg.rank_pattern, site.key, cfg.r))
        alpha = float(pattern_value(cfg.alpha_pattern, site.key, cfg.alpha))
        add_lora(model.get_submodule(site.path), site.target, site.start, site.stop, r, alpha, cfg.dropout,
                 cfg.rslora)
    return sites


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None, **options: Any) -> nn.Module:
    """Freeze the model and add trainable LoRA updates where cfg.targets say; returns the model."""
    cfg = cfg or LoraConfig(**options)
    require_fresh(model, "lora")
    select_sites(model, cfg)  # validate before changing anything
    freeze(model)
    add_loras(model, cfg)
    record_method(model, "lora", cfg.options())
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors only, by their names in the model's state dict."""
    return {f"{path}.lora.{name}": p.detach().cpu() for path, linear in lora_layers(model)
            for name, p in linear.lora.named_parameters()}


# -- merging -------------------------------------------------------------------------------------


@torch.no_grad()
def _fold(weight: torch.Tensor, lora: LoraSet, sign: float) -> None:
    for update in lora.values():
        weight[update.start:update.stop] += sign * update.delta_weight().to(weight.dtype)


def merge_lora(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold every LoRA update into its weight. unload=True (the default) also removes the updates and
    de-quantizes a QLoRA base: the result is a plain model to save or export. unload=False keeps them,
    merged, so `unmerge_lora` can undo it (float bases only)."""
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if quantized and not unload:
        raise UserError("a quantized (qlora) base merges only with unload=True: the merged weights are de-quantized")
    for path, linear in lora_layers(model):
        lora = linear.lora
        if isinstance(linear, QuantizedLinear):
            plain = linear.to_linear()
            _fold(plain.weight, lora, 1.0)
            model.set_submodule(path, plain)
            continue
        if not lora.merged:
            _fold(linear.weight, lora, 1.0)
        lora.merged = True
        if unload:
            del linear.lora
            remove_hook(linear, _lora_hook)
    if unload:
        dequantize_model(model)
        clear_method(model)
        for p in model.parameters():
            p.requires_grad_(True)  # a plain model again, as a loaded checkpoint would be
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, unload=False)`: subtract the updates again (exact up to fp rounding)."""
    for _, linear in lora_layers(model):
        if linear.lora.merged:
            _fold(linear.weight, linear.lora, -1.0)
            linear.lora.merged = False
    return model
