"""GPTQ (Frantar et al. 2022): quantize each weight column by column, pushing every column's rounding error onto
the columns not yet quantized through the inverse Hessian of the layer's reconstruction loss ‖WX − ŴX‖².

The transformer blocks are processed in order. For each block, H = 2 X Xᵀ / n of every linear's inputs X is
collected on the calibration sequences with the earlier blocks already quantized (forward pre-hooks; the forward
stops right after the block). Per linear: dead inputs (H_jj = 0) get H_jj = 1 and a zero weight column; the
diagonal is dampened by damp · mean(diag H); the upper Cholesky factor of H⁻¹ drives the column updates, applied
lazily in batches of `block_size` columns. Groups are the contiguous `group_size` columns of "int4": a group's
scale and zero point are chosen when its first column comes up, from the group's *current* (error-updated)
values. With act_order the columns are processed by descending H_jj, and the codes are put back in the original
column order at the end, so the result is an ordinary `Int4Linear`. All math is float32; the loop runs over
columns, each step a vector operation over all rows.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from lmforge.compress.quant import (
    Int4Linear,
    asymmetric_params,
    block_linears,
    dequantize_asymmetric,
    has_tied_head,
    head_linears,
    quantize_asymmetric,
    require_unquantized,
    untie_head,
)
from lmforge.errors import UserError
from lmforge.nn import Block


class _Stop(Exception):
    """Raised from a block's forward hook: the rest of the model is not needed for this block's inputs."""


@torch.no_grad()
def collect_hessians(model: nn.Module, calibration: torch.Tensor, linears: dict[str, nn.Module],
                     stop_after: nn.Module | None = None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / n of each named linear's inputs over the calibration rows (n = tokens seen)."""
    sums = {name: torch.zeros(m.in_features, m.in_features, device=calibration.device) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def accumulate(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
        return hook

    def stop(*_: Any) -> None:
        raise _Stop

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        for batch in calibration.split(batch_size):
            with contextlib.suppress(_Stop):
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2 * sums[name] / max(counts[name], 1) for name in linears}


def _upper_inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp · mean(diag H) · I)⁻¹; the damping grows tenfold until H is positive
    definite in float32 (nearly collinear inputs)."""
    base = damp * h.diagonal().mean().item()
    for attempt in range(6):
        damped = h + (base * 10 ** attempt) * torch.eye(h.shape[0], device=h.device)
        factor, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if info.item() == 0:
                return upper
    raise UserError("GPTQ's Hessian is not positive definite even with 1e5x the damping; use more (and more "
                    "varied) calibration sequences, or --method int4 (round-to-nearest)")


def _current_group(w: torch.Tensor, w1: torch.Tensor, err1: torch.Tensor, hinv: torch.Tensor, i1: int, i2: int,
                   done: int, positions: torch.Tensor) -> torch.Tensor:
    """The current values of the columns at `positions` (processing order, none quantized yet): inside the lazy
    batch they are up to date in w1; beyond it they still lack the batch's pending updates, added here."""
    inside = (positions >= i1) & (positions < i2)
    values = torch.empty(w.shape[0], positions.numel(), device=w.device)
    values[:, inside] = w1[:, positions[inside] - i1]
    outside = positions[~inside]
    if outside.numel():
        values[:, ~inside] = w[:, outside] - err1[:, :done] @ hinv[i1:i1 + done][:, outside]
    return values


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                         damp: float = 0.01, act_order: bool = True, block_size: int = 128
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ on one (out, in) weight → (codes (out, in) uint8 in the original column order, scales and integer zero
    points (out, in / group_size)), the form `Int4Linear.buffers` stores."""
    w, h = weight.detach().float().clone(), hessian.detach().float().clone()
    rows, n = w.shape
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n, device=w.device)
    inverse = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _upper_inverse_cholesky(h, damp)
    n_groups = n // group_size
    group_of = (perm // group_size).tolist()  # each processing position's (original) group
    group_positions = inverse.view(n_groups, group_size)  # each group's columns, as processing positions
    scales = torch.zeros(rows, n_groups, device=w.device)
    zeros = torch.zeros(rows, n_groups, device=w.device)
    started = [False] * n_groups
    codes = torch.zeros(rows, n, dtype=torch.uint8, device=w.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=w.device), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            if not started[g]:
                current = _current_group(w, w1, err1, hinv, i1, i2, i, group_positions[g])
                scales[:, g], zeros[:, g] = asymmetric_params(current, bits)
                started[g] = True
            column = w1[:, i:i + 1]
            q = quantize_asymmetric(column, scales[:, g], zeros[:, g], bits)
            codes[:, i1 + i] = q[:, 0]
            err = (column - dequantize_asymmetric(q, scales[:, g], zeros[:, g])) / hinv1[i, i]
            w1[:, i:] -= err * hinv1[i:i + 1, i:]
            err1[:, i:i + 1] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, inverse], scales, zeros


def gptq_linear(linear: nn.Linear, hessian: torch.Tensor, bits: int = 4, group_size: int = 128, damp: float = 0.01,
                act_order: bool = True, block_size: int = 128) -> Int4Linear:
    """A GPTQ-quantized `Int4Linear` for `linear`, given the Hessian of its inputs."""
    options = Int4Linear.check_options(linear.in_features, bits=bits, group_size=group_size)
    codes, scales, zeros = gptq_quantize_weight(linear.weight, hessian, bits, group_size, damp, act_order, block_size)
    buffers = Int4Linear.buffers(codes, scales, zeros, bits)
    return Int4Linear(linear.in_features, linear.out_features, buffers, linear.bias, **options)


def _check(model: nn.Module, calibration: torch.Tensor, bits: int, group_size: int, damp: float, block_size: int,
           names: list[str]) -> None:
    family = getattr(getattr(model, "cfg", None), "family", "causal")
    if family == "seq2seq":
        raise UserError("GPTQ is implemented for causal and masked models, not seq2seq; use --method int4 "
                        "(group-wise round-to-nearest) for this model")
    require_unquantized(model)
    if calibration.dim() != 2 or calibration.numel() == 0 or calibration.dtype not in (torch.int64, torch.int32):
        raise UserError(f"GPTQ calibration must be token ids of shape (sequences, length), got {calibration.dtype} "
                        f"{tuple(calibration.shape)}; pass some held-in text as calibration data")
    if not 0 < damp < 1:
        raise UserError(f"damp={damp} must be in (0, 1): the fraction of the mean Hessian diagonal added to it")
    if block_size < 1:
        raise UserError(f"block_size={block_size} must be a positive number of columns")
    for name in names:
        Int4Linear.check_options(model.get_submodule(name).in_features, bits=bits, group_size=group_size)


def gptq_quantize_model(model: nn.Module, calibration: torch.Tensor, bits: int = 4, group_size: int = 128,
                        damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                        include_head: bool = False) -> dict[str, dict[str, Any]]:
    """Quantize the blocks' linears (and the head, if asked) with GPTQ on `calibration` token ids (n, T), in
    place; returns the same layer map as `quantize_model` (format "int4" with `bits` and `group_size`)."""
    names = block_linears(model) + (head_linears(model) if include_head else [])
    _check(model, calibration, bits, group_size, damp, block_size, names)
    device = next(model.parameters()).device
    calibration = calibration.long().to(device)
    was_training = model.training
    model.eval()
    layer_map: dict[str, dict[str, Any]] = {}

    def quantize(linears: dict[str, nn.Module], stop_after: nn.Module | None) -> None:
        hessians = collect_hessians(model, calibration, linears, stop_after)
        for name, linear in linears.items():
            module = gptq_linear(linear, hessians[name], bits, group_size, damp, act_order, block_size)
            model.set_submodule(name, module)
            layer_map[name] = {"format": module.format, **module.options()}

    for block_name, block in [(n, m) for n, m in model.named_modules() if isinstance(m, Block)]:
        quantize({f"{block_name}.{n}": m for n, m in block.named_modules() if isinstance(m, nn.Linear)}, block)
    if include_head:
        untied = has_tied_head(model)
        if untied:
            untie_head(model)
        quantize({name: model.get_submodule(name) for name in head_linears(model)}, None)
        if untied:
            layer_map["lm_head"]["untied"] = True
    model.train(was_training)
    return layer_map
