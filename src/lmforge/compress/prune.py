"""Pruning: zero the least important weights (magnitude, Wanda, N:M) or remove whole attention heads and MLP
neurons so the model really shrinks.

Targets are the linear layers inside transformer blocks (`lmforge.nn.Block`) of every family; embeddings and
heads are left alone. Unstructured methods give a `PruningMasks` (parameter name -> bool, True = keep), which
also serves as the training loop's `on_step` hook, so recovery fine-tuning keeps pruned weights at exactly 0.

- magnitude: score |W|; scope "layer" (each layer to the sparsity), "global" (one ranking over every target
  weight) or "row" (each output row);
- wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, the input feature's norm over calibration tokens, ranked per
  output row; by default block by block, each block's activations gathered after the blocks before it were pruned
  (the paper's sequential order);
- N:M (2:4): in every group of M consecutive inputs of a row keep the N with the highest score (magnitude or
  wanda);
- heads / neurons: importance from calibration data, the same count removed in every layer so one ModelConfig
  still describes the model; `shrink` slices the tensors into a smaller model (n_heads or d_ff shrinks, d_head is
  pinned). A head's importance is its squared contribution through the out-projection over the calibration tokens,
  sum_t ||W_out[:, h] x_th||^2; under GQA whole key/value groups go (round(S * kv_heads) per layer), under
  multi-query attention query heads (the one key/value head stays); cross-attention
  loses as many heads as self-attention (one n_heads in the config), and a stack sharing one relative-position table
  (T5) drops the same heads in all its self-attention layers. A neuron's importance is ||activation_j|| *
  ||W_down[:, j]||; gated MLPs (SwiGLU, GeGLU) lose the gate and up rows together.

Exactness: a scope of n weights at sparsity S loses exactly round(S * n) of them; ties are broken by position
(the lower flat index is pruned first), never by a `<= threshold` that over-prunes on ties.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmforge.checkpoint import load_model_tensors, model_tensors
from lmforge.errors import UserError
from lmforge.models import Model, model_class
from lmforge.nn import Block, TransformerStack
from lmforge.nn.attention import Attention, CrossAttention
from lmforge.nn.mlp import MLP

METHODS = ("magnitude", "wanda", "2:4", "heads", "neurons")
UNSTRUCTURED = ("magnitude", "wanda")
STRUCTURED = ("heads", "neurons")
SCOPES = ("auto", "layer", "global", "row")
SCORES = ("magnitude", "wanda")
Batches = Sequence[dict[str, torch.Tensor]]


# -- options ---------------------------------------------------------------------------------------------------------
def check_options(method: str, sparsity: float | None, scope: str = "auto", score: str = "magnitude", n: int = 2,
                  m: int = 4, gradual: bool = False) -> None:
    """Refuse a bad combination before any model or data is read; each error is one line naming the fix."""
    if method not in METHODS:
        raise UserError(f"--method '{method}' is not a pruning method; choose one of: {', '.join(METHODS)}")
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise UserError(f"--sparsity {sparsity} must be in [0, 1) (the fraction of weights, heads or neurons removed)")
    if scope not in SCOPES:
        raise UserError(f"--scope '{scope}' is not one of: {', '.join(SCOPES)}")
    if score not in SCORES:
        raise UserError(f"--score '{score}' is not one of: {', '.join(SCORES)}")
    if method == "2:4":
        if not (0 < n < m):
            raise UserError(f"--n {n} --m {m}: N:M sparsity keeps n of every m weights, so it needs 0 < n < m")
        if sparsity is not None and abs(sparsity - (1 - n / m)) > 1e-9:
            raise UserError(f"--method 2:4 with --n {n} --m {m} prunes exactly {1 - n / m:g} of the weights; drop "
                            f"--sparsity {sparsity} (or change --n/--m)")
    if gradual and method not in UNSTRUCTURED:
        raise UserError(f"--gradual works with --method magnitude or wanda, not '{method}'")


def resolve_scope(method: str, scope: str) -> str:
    """auto: per layer for magnitude, per output row for Wanda (the paper's comparison group)."""
    if scope != "auto":
        return scope
    return "row" if method == "wanda" else "layer"


# -- targets ---------------------------------------------------------------------------------------------------------
def transformer_blocks(model: nn.Module) -> list[tuple[str, Block]]:
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, Block)]
    if not blocks:
        raise UserError(f"{type(model).__name__} has no transformer blocks (lmforge.nn.Block) to prune; give an "
                        "lmforge model (causal, masked or seq2seq)")
    return blocks


def block_linears(model: nn.Module, blocks: list[tuple[str, Block]] | None = None) -> dict[str, nn.Linear]:
    """Module name -> Linear for every linear layer inside a transformer block (embeddings and heads excluded)."""
    linears = {}
    for block_name, block in blocks or transformer_blocks(model):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                linears[f"{block_name}.{name}"] = module
    return linears


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def calibration_batches(model: Model, ids: torch.Tensor, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Forward arguments over calibration windows (n, length): the whole window for causal and masked models;
    for seq2seq the first half is the encoder's input and the second half the decoder's."""
    batches = []
    for chunk in ids.long().split(batch_size):
        if model.cfg.family == "seq2seq":
            half = chunk.shape[1] // 2
            batches.append({"input_ids": chunk[:, :half], "decoder_input_ids": chunk[:, half:]})
        else:
            batches.append({"input_ids": chunk})
    return batches


class _Stop(Exception):
    """Raised by a hook to end a calibration forward once what it needed has been seen."""


@torch.no_grad()
def _run(model: nn.Module, batches: Batches) -> None:
    """Forward every batch in eval mode (a hook raising _Stop ends that batch's forward early)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was_training)


def _collect_norms(linears: dict[str, nn.Linear], run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of each linear over all tokens that `run()` sends through it."""
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
            for name, lin in linears.items()}

    def hook(name: str) -> Callable[..., None]:
        def accumulate(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            sums[name] += x.reshape(-1, x.shape[-1]).double().square().sum(0)
        return accumulate

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: total.sqrt().float() for name, total in sums.items()}


def input_norms(model: nn.Module, linears: dict[str, nn.Linear], batches: Batches) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of each linear over the calibration tokens (forward pre-hooks)."""
    if not batches:
        raise UserError("Wanda and structured pruning need calibration text; give --data.sources")
    return _collect_norms(linears, lambda: _run(model, batches))


def _block_calls(model: nn.Module, block: Block, batches: Batches) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) `block` is called with on each calibration batch; the forward stops there."""
    calls = []

    def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _run(model, batches)
    finally:
        handle.remove()
    return calls


# -- ranking ---------------------------------------------------------------------------------------------------------
def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool tensor shaped like `scores`, True at exactly its k smallest entries; among equal scores the lower flat
    index goes first (kthvalue finds the threshold, so no full sort of a large tensor is needed)."""
    flat = scores.reshape(-1)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.float().kthvalue(k).values.to(flat.dtype)
    chosen = flat < threshold
    ties = (flat == threshold).nonzero().squeeze(1)[: k - int(chosen.sum())]
    chosen[ties] = True
    return chosen.view_as(scores)


def lowest_k_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at exactly the k smallest entries of every row (a stable sort breaks ties by column)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        chosen.scatter_(1, scores.argsort(dim=1, stable=True)[:, :k], True)
    return chosen


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks (True = keep) pruning exactly round(sparsity * n) of each scope's n weights."""
    if scope == "global":
        flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
        pruned = lowest_k(flat, round(sparsity * flat.numel())).split([s.numel() for s in scores.values()])
        return {name: ~p.view_as(s) for (name, s), p in zip(scores.items(), pruned, strict=True)}
    if scope == "row":
        return {name: ~lowest_k_per_row(s, round(sparsity * s.shape[1])) for name, s in scores.items()}
    return {name: ~lowest_k(s, round(sparsity * s.numel())) for name, s in scores.items()}


def nm_keep(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep-mask holding the n highest-scored weights of every group of m consecutive inputs in each row."""
    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"{name} has {cols} inputs, not a multiple of --m {m}; N:M sparsity needs whole groups")
    groups = scores.reshape(rows, cols // m, m)
    pruned = torch.zeros_like(groups, dtype=torch.bool)
    pruned.scatter_(2, groups.argsort(dim=2, stable=True)[..., : m - n], True)
    return ~pruned.reshape(rows, cols)


def weight_scores(linears: dict[str, nn.Linear], norms: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """|W| (magnitude), or |W| * ||X_j|| (Wanda) when input norms are given; keys are parameter names."""
    scores = {}
    for name, lin in linears.items():
        score = lin.weight.detach().abs().float()
        if norms is not None:
            score = score * norms[name].to(score.device)[None, :]
        scores[f"{name}.weight"] = score
    return scores


# -- masks -----------------------------------------------------------------------------------------------------------
class PruningMasks:
    """Parameter name -> bool keep-mask. `apply(model)` zeros the pruned weights; called as the loop's
    `on_step(step, model, optimizer)` it re-applies the masks after every optimizer step and zeros the AdamW moments
    of pruned weights, so they stay exactly 0 through recovery fine-tuning. `state_dict`/`load_state_dict` let the
    loop store the masks in its checkpoint, so a resumed run keeps them."""

    def __init__(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = {name: mask.bool() for name, mask in masks.items()}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            if name not in params:
                raise ValueError(f"pruning mask '{name}' names no parameter of the model")
            param = params[name]
            if mask.device != param.device:  # moved once, not at every step
                mask = self.masks[name] = mask.to(param.device)
            param.masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def zero_moments(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            state = optimizer.state.get(params[name], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state and state[key].shape == mask.shape:
                    state[key].masked_fill_(~mask.to(state[key].device), 0.0)

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.apply(model)
        self.zero_moments(model, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {f"mask.{name}": mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        self.masks = {name[len("mask."):]: value.bool() for name, value in values.items() if name.startswith("mask.")}

    def sparsity(self) -> dict[str, Any]:
        """Fraction pruned per parameter and overall."""
        pruned = {name: int((~mask).sum()) for name, mask in self.masks.items()}
        total = sum(mask.numel() for mask in self.masks.values())
        return {"per_layer": {name: pruned[name] / mask.numel() for name, mask in self.masks.items()},
                "overall": sum(pruned.values()) / total if total else 0.0}


def unstructured_masks(model: nn.Module, method: str, sparsity: float, scope: str = "auto",
                       batches: Batches = (), sequential: bool = True) -> PruningMasks:
    """Magnitude or Wanda keep-masks at `sparsity` (the model's weights are not changed; call `apply`)."""
    scope = resolve_scope(method, scope)
    blocks = transformer_blocks(model)
    if method == "magnitude":
        return PruningMasks(masks_from_scores(weight_scores(block_linears(model, blocks), None), sparsity, scope))
    if not sequential or scope == "global":
        linears = block_linears(model, blocks)
        return PruningMasks(masks_from_scores(weight_scores(linears, input_norms(model, linears, batches)),
                                              sparsity, scope))
    return _sequential(model, blocks, batches,
                       lambda scores: masks_from_scores(scores, sparsity, scope))


def _stacks(model: nn.Module) -> list[TransformerStack]:
    return [module for module in model.modules() if isinstance(module, TransformerStack) and len(module.blocks)]


def _sequential(model: nn.Module, blocks: list[tuple[str, Block]], batches: Batches,
                choose: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> PruningMasks:
    """Wanda's order: a block's input norms are gathered with the blocks before it already pruned, its masks chosen
    and applied, and its pruned output becomes the next block's input. Each stack's first-block inputs are captured
    once (an encoder-decoder's decoder after its encoder is pruned, so its memory is the pruned one); the blocks
    then run one at a time on those cached hidden states, so the cost is about two forward passes, not one per
    block. The weights are restored at the end: the caller applies the returned masks."""
    if not batches:
        raise UserError("Wanda and structured pruning need calibration text; give --data.sources")
    names = {id(block): name for name, block in blocks}
    masks: dict[str, torch.Tensor] = {}
    saved: dict[nn.Linear, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for stack in _stacks(model):
                calls = _block_calls(model, stack.blocks[0], batches)
                for block in stack.blocks:
                    linears = block_linears(model, [(names[id(block)], block)])
                    norms = _collect_norms(linears, lambda: [block(*a, **k) for a, k in calls])  # noqa: B023
                    chosen = choose(weight_scores(linears, norms))
                    for name, lin in linears.items():
                        saved[lin] = lin.weight.detach().clone()
                        lin.weight.masked_fill_(~chosen[f"{name}.weight"], 0.0)
                    masks |= chosen
                    calls = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in calls]
    finally:
        with torch.no_grad():
            for lin, weight in saved.items():
                lin.weight.copy_(weight)
        model.train(was_training)
    return PruningMasks(masks)


def nm_masks(model: nn.Module, n: int, m: int, score: str = "magnitude", batches: Batches = (),
             sequential: bool = True) -> PruningMasks:
    """N:M keep-masks: n of every m consecutive inputs of each row kept, by magnitude or Wanda score."""
    blocks = transformer_blocks(model)

    def choose(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: nm_keep(s, n, m, name) for name, s in scores.items()}

    if score == "magnitude":
        return PruningMasks(choose(weight_scores(block_linears(model, blocks), None)))
    if not sequential:
        linears = block_linears(model, blocks)
        return PruningMasks(choose(weight_scores(linears, input_norms(model, linears, batches))))
    return _sequential(model, blocks, batches, choose)


# -- gradual pruning -------------------------------------------------------------------------------------------------
def cubic_sparsity(step: int, target: float, end_step: int) -> float:
    """Zhu & Gupta (2017): s_t = S * (1 - (1 - t/T)^3), rising from 0 fast at first, reaching S at step T."""
    progress = min(max(step, 0), end_step) / end_step
    return target * (1.0 - (1.0 - progress) ** 3)


class GradualPruning(PruningMasks):
    """Masks that start empty and tighten along the cubic schedule: every `every` steps up to `end_step` (and at
    `end_step` itself) the weights are re-scored and re-masked; from `end_step` on the sparsity is exactly `target`.
    Wanda's input norms are gathered once, before training, and reused for every re-scoring."""

    def __init__(self, model: nn.Module, target: float, scope: str, end_step: int, every: int,
                 norms: dict[str, torch.Tensor] | None = None) -> None:
        self.linears = block_linears(model)
        super().__init__({f"{name}.weight": torch.ones_like(lin.weight, dtype=torch.bool)
                          for name, lin in self.linears.items()})
        self.target, self.scope, self.norms = target, scope, norms
        self.end_step, self.every = max(1, end_step), max(1, every)
        self.current = 0.0

    def __call__(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if step <= self.end_step and (step % self.every == 0 or step == self.end_step):
            self.current = cubic_sparsity(step, self.target, self.end_step)
            self.masks = masks_from_scores(weight_scores(self.linears, self.norms), self.current, self.scope)
        super().__call__(step, model, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "current": self.current}

    def load_state_dict(self, values: dict[str, Any]) -> None:
        super().load_state_dict(values)
        self.current = float(values.get("current", self.current))


# -- structured: heads and neurons -----------------------------------------------------------------------------------
@dataclass
class StructuredPlan:
    """Which heads (query-head indices, whole KV groups) or MLP hidden units each module keeps; the same count
    everywhere. `tables` maps relative-position bias tables to the heads they keep."""

    kind: str
    keep: dict[str, torch.Tensor]
    total: int
    tables: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return len(next(iter(self.keep.values())))

    @property
    def removed_fraction(self) -> float:
        return 1.0 - self.kept / self.total

    def masks(self, model: nn.Module) -> PruningMasks:
        """Keep-masks that zero what the plan removes (the out-projection columns of removed heads, the down
        columns of removed neurons): the masked model computes what the shrunk one does."""
        masks = {}
        for name, kept in self.keep.items():
            module = model.get_submodule(name)
            proj, width = (module.out, module.head_dim) if self.kind == "heads" else (module.down, 1)
            columns = torch.zeros(proj.in_features, dtype=torch.bool, device=proj.weight.device)
            columns[_units(kept.to(columns.device), width)] = True
            masks[f"{name}.{'out' if self.kind == 'heads' else 'down'}.weight"] = columns[None, :].expand_as(
                proj.weight).clone()
        return PruningMasks(masks)


def _units(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Row/column positions of whole units (heads of `width` channels) in the order given."""
    return (indices[:, None] * width + torch.arange(width, device=indices.device)).reshape(-1)


def _attention_modules(model: nn.Module) -> dict[str, Attention]:
    return {f"{block_name}.{part}": getattr(block, part) for block_name, block in transformer_blocks(model)
            for part in ("attn", "cross_attn") if getattr(block, part) is not None}


def head_importance(model: nn.Module, batches: Batches) -> dict[str, torch.Tensor]:
    """Per attention module, each query head's squared contribution to the output over the calibration tokens:
    sum_t ||W_out[:, h] x_{t,h}||^2 = trace(W_h G_h W_h^T), with G_h the head's Gram matrix of outputs."""
    attentions = _attention_modules(model)
    grams: dict[str, torch.Tensor] = {}

    def hook(name: str, module: Attention) -> Callable[..., None]:
        def accumulate(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach().double().reshape(-1, module.n_heads, module.head_dim)
            gram = torch.einsum("nhk,nhl->hkl", x, x)
            grams[name] = grams[name] + gram if name in grams else gram
        return accumulate

    handles = [module.out.register_forward_pre_hook(hook(name, module)) for name, module in attentions.items()]
    try:
        _run(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    importance = {}
    for name, module in attentions.items():
        w = module.out.weight.detach().double().reshape(module.out.out_features, module.n_heads, module.head_dim)
        importance[name] = torch.einsum("dhk,hkl,dhl->h", w, grams[name], w).float()
    return importance


def plan_heads(model: Model, sparsity: float, batches: Batches) -> StructuredPlan:
    """Remove round(sparsity * units) units from every attention module, the least important first. A unit is a
    head (multi-head attention), a whole key/value group with its query heads (GQA), or a query head (multi-query
    attention, whose one key/value head stays). A stack with a relative-position table (T5) shares one table, hence
    one head set, over its self-attention layers: their importance is summed and the same heads go in all of them."""
    cfg = model.cfg
    group = cfg.n_heads // cfg.kv_heads
    units, width = (cfg.n_heads, 1) if cfg.kv_heads == 1 else (cfg.kv_heads, group)
    removed = round(sparsity * units)
    if removed >= units:
        what = "heads" if width == 1 else f"key/value head groups (of {width} query heads each)"
        raise UserError(f"--sparsity {sparsity} would remove all {units} {what} of every layer; use a smaller "
                        "sparsity")
    importance = head_importance(model, batches)

    def keep_from(scores: torch.Tensor) -> torch.Tensor:
        kept = (~lowest_k(scores.reshape(units, width).sum(1), removed)).nonzero().squeeze(1)
        return _units(kept, width)

    keep = {name: keep_from(score) for name, score in importance.items()}
    tables = {}
    for stack_name, stack in model.named_modules():
        relative = getattr(getattr(stack, "positions", None), "relative", None)
        if relative is None:
            continue
        names = [f"{stack_name}.blocks.{i}.attn" for i in range(len(stack.blocks))]
        shared = keep_from(torch.stack([importance[name] for name in names]).sum(0))
        keep |= dict.fromkeys(names, shared)
        tables[f"{stack_name}.positions.relative.weight"] = shared
    return StructuredPlan("heads", keep, cfg.n_heads, tables)


def plan_neurons(model: Model, sparsity: float, batches: Batches) -> StructuredPlan:
    """Remove round(sparsity * hidden) MLP hidden units per layer, the lowest ||activation|| * ||down column||."""
    hidden = model.cfg.hidden_size
    removed = round(sparsity * hidden)
    if removed >= hidden:
        raise UserError(f"--sparsity {sparsity} would remove all {hidden} MLP neurons of every layer; use a smaller "
                        "sparsity")
    mlps = {f"{name}.mlp": block.mlp for name, block in transformer_blocks(model)}
    norms = input_norms(model, {name: mlp.down for name, mlp in mlps.items()}, batches)
    keep = {}
    for name, mlp in mlps.items():
        score = norms[name] * mlp.down.weight.detach().float().norm(dim=0)
        keep[name] = (~lowest_k(score, removed)).nonzero().squeeze(1)
    return StructuredPlan("neurons", keep, hidden)


def _slice_rows(tensors: dict[str, torch.Tensor], prefix: str, rows: torch.Tensor) -> None:
    for suffix in ("weight", "bias"):
        if f"{prefix}.{suffix}" in tensors:
            tensors[f"{prefix}.{suffix}"] = tensors[f"{prefix}.{suffix}"][rows].contiguous()


def _slice_attention(tensors: dict[str, torch.Tensor], name: str, module: Attention, kept: torch.Tensor) -> None:
    hd, heads, kv = module.head_dim, module.n_heads, module.n_kv_heads
    group = heads // kv
    q_rows = _units(kept, hd)
    kv_rows = _units(torch.unique(kept // group), hd)  # the key/value heads the kept queries read
    if isinstance(module, CrossAttention):
        _slice_rows(tensors, f"{name}.q", q_rows)
        _slice_rows(tensors, f"{name}.kv", torch.cat([kv_rows, kv * hd + kv_rows]))
    else:
        _slice_rows(tensors, f"{name}.qkv", torch.cat([q_rows, heads * hd + kv_rows, (heads + kv) * hd + kv_rows]))
    tensors[f"{name}.out.weight"] = tensors[f"{name}.out.weight"][:, q_rows].contiguous()


def _slice_mlp(tensors: dict[str, torch.Tensor], name: str, module: MLP, kept: torch.Tensor) -> None:
    hidden = module.down.in_features
    _slice_rows(tensors, f"{name}.up", torch.cat([kept, hidden + kept]) if module.gated else kept)
    tensors[f"{name}.down.weight"] = tensors[f"{name}.down.weight"][:, kept].contiguous()


def shrunk_config(model: Model, plan: StructuredPlan) -> Any:
    """The smaller model's ModelConfig: fewer heads (d_head pinned to the old width) or a smaller d_ff."""
    cfg = model.cfg
    if plan.kind == "neurons":
        return dataclasses.replace(cfg, d_ff=plan.kept)
    group = cfg.n_heads // cfg.kv_heads
    kv = None if cfg.n_kv_heads is None else len(torch.unique(next(iter(plan.keep.values())) // group))
    return dataclasses.replace(cfg, n_heads=plan.kept, n_kv_heads=kv, d_head=cfg.head_dim)


def shrink(model: Model, plan: StructuredPlan) -> Model:
    """A new, smaller model holding only what the plan keeps (real smaller tensors, so it runs faster)."""
    tensors = model_tensors(model)
    for name, kept in plan.keep.items():
        module = model.get_submodule(name)
        if plan.kind == "heads":
            _slice_attention(tensors, name, module, kept.cpu())
        else:
            _slice_mlp(tensors, name, module, kept.cpu())
    for name, kept in plan.tables.items():
        tensors[name] = tensors[name][:, kept.cpu()].contiguous()
    cfg = shrunk_config(model, plan)
    smaller = model_class(cfg).for_loading(cfg)
    load_model_tensors(smaller, tensors, "the pruned model", assign=True)
    return smaller.to(_device(model)).train(model.training)


# -- one entry point -------------------------------------------------------------------------------------------------
@dataclass
class PruneOutcome:
    model: Model
    masks: PruningMasks | None
    info: dict[str, Any]


def prune(model: Model, method: str, sparsity: float | None = None, *, scope: str = "auto",
          score: str = "magnitude", n: int = 2, m: int = 4, batches: Batches = (),
          sequential: bool = True) -> PruneOutcome:
    """Prune `model` by `method`. Unstructured and N:M: the weights are zeroed in place and the masks returned
    (hold them during recovery). heads/neurons: a new smaller model is returned (no masks needed)."""
    check_options(method, sparsity, scope, score, n, m)
    transformer_blocks(model)
    asked = (1 - n / m) if method == "2:4" else (0.5 if sparsity is None else float(sparsity))
    info: dict[str, Any] = {"method": method, "sparsity_asked": asked}
    if method in STRUCTURED:
        plan = (plan_heads if method == "heads" else plan_neurons)(model, asked, batches)
        smaller = shrink(model, plan)
        info |= {"unit": plan.kind, "per_layer_before": plan.total, "per_layer_after": plan.kept,
                 "sparsity_reached": plan.removed_fraction, "config_changes": _config_changes(model, smaller),
                 "parameters_before": model.num_parameters(), "parameters_after": smaller.num_parameters(),
                 "kept": {name: kept.tolist() for name, kept in plan.keep.items()}}
        return PruneOutcome(smaller, None, info)
    if method == "2:4":
        masks = nm_masks(model, n, m, score, batches, sequential)
        info |= {"n": n, "m": m, "score": score}
    else:
        masks = unstructured_masks(model, method, asked, scope, batches, sequential)
        info["scope"] = resolve_scope(method, scope)
    masks.apply(model)
    reached = masks.sparsity()
    info |= {"sparsity_reached": reached["overall"], "per_layer": reached["per_layer"]}
    return PruneOutcome(model, masks, info)


def _config_changes(before: Model, after: Model) -> dict[str, list[Any]]:
    old, new = before.cfg.to_dict(), after.cfg.to_dict()
    return {key: [old[key], new[key]] for key in old if old[key] != new[key]}
