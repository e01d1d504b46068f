"""Data-parallel training on PyTorch's own engine, `torch.distributed`, launched by `torchrun`.

    torchrun --standalone --nproc_per_node N -m lmforge.cli pretrain ... --train.distributed MODE

MODE (`--train.distributed`) and what each rank holds, in the ZeRO paper's terms:

    none   one process (the default); under torchrun with more than one process it is an error
    ddp    DistributedDataParallel: full weights, gradients and optimizer state on every rank; gradients all-reduced
    zero1  DDP + ZeroRedundancyOptimizer: the optimizer state (Adam's two moments) sharded across ranks
    zero2  FSDP2 `fully_shard` per block + root, reshard_after_forward=False: optimizer state and gradients
           sharded; the gathered weights stay in memory from forward to backward
    zero3  FSDP2 `fully_shard`, reshard_after_forward=True: weights sharded as well, gathered block by block
    fsdp   the same as zero3

The process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): gloo on CPU, NCCL on CUDA
(each rank on cuda:LOCAL_RANK), with a timeout so that a collective whose peer died errors out instead of hanging.

Each rank's micro-batches are `batches((step * grad_accum + micro) * world + rank)`: N ranks with grad_accum a see
the very micro-batches, and average the very gradients, of one process with grad_accum N*a. Resume is exact at
any world size with the same N*a, because the data position is counted in micro-batches.

Checkpoints: the ordinary folder (config, model.safetensors, tokenizer, full trainer state) gathered on rank 0,
which one process, `lmforge.load`, `convert` and a resume at any world size read; beside it a sharded copy written
by every rank with `torch.distributed.checkpoint` (DCP), which a resume under the same kind of sharding reads.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from lmforge.device import pick_device
from lmforge.errors import UserError
from lmforge.nn.block import Block

MODES = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp")
FSDP_MODES = ("zero2", "zero3", "fsdp")
SHARDED_DIR = "checkpoint_sharded"
SHARDED_META = "lmforge_sharded.json"
# Long enough for a slow checkpoint write on a big model, short enough that a dead peer does not hang a run forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=15)


def launched_world() -> int:
    """How many processes torchrun started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_mode(mode: str) -> None:
    """Fail before any work on an unknown mode, or a distributed one outside torchrun (checked with the config)."""
    if mode not in MODES:
        raise UserError(f"train.distributed='{mode}' is not one of: {', '.join(MODES)}")
    if mode != "none" and "WORLD_SIZE" not in os.environ:
        raise UserError(f"--train.distributed {mode} needs torchrun: torchrun --standalone --nproc_per_node N "
                        f"-m lmforge.cli <command> ... --train.distributed {mode}")


def check_launch(mode: str) -> None:
    """check_mode, and refuse several processes that would each train alone (checked when training starts:
    a config's default, 'none', is built before the command line's value replaces it)."""
    check_mode(mode)
    if mode == "none" and launched_world() > 1:
        raise UserError(f"torchrun started {launched_world()} processes but --train.distributed is none; "
                        "pass --train.distributed ddp | zero1 | zero2 | zero3")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size, device and sharding mode."""

    mode: str
    rank: int
    world: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.mode in FSDP_MODES

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (a copy; the input is left alone)."""
        values = values.detach().clone()
        if self.active:
            dist.all_reduce(values)
        return values


def setup(mode: str, device_name: str = "auto") -> Dist:
    """Join torchrun's process group once per process (later calls reuse it); one plain process for 'none'."""
    check_launch(mode)
    device = pick_device(device_name)
    if mode == "none":
        return Dist(mode, 0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if backend == "nccl" else None)
        atexit.register(_leave)
    return Dist(mode, dist.get_rank(), dist.get_world_size(), device)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def micro_index(step: int, micro: int, grad_accum: int, d: Dist) -> int:
    """The global micro-batch index this rank trains on (see the module docstring)."""
    return (step * grad_accum + micro) * d.world + d.rank


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist, param_dtype: torch.dtype | None
         ) -> tuple[nn.Module, torch.optim.Optimizer]:
    """(module to run forward/backward through, optimizer to step) for the mode. The optimizer's hyper-parameters,
    groups and any restored state carry over; `model` is sharded in place under FSDP."""
    if not d.active:
        return model, optimizer
    _broadcast_weights(model)  # every rank starts from rank 0's weights, whatever each one initialised
    if d.mode in ("ddp", "zero1"):
        ids = [d.device.index] if d.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return ddp, (_zero1(optimizer) if d.mode == "zero1" else optimizer)
    if any(not p.requires_grad for p in model.parameters()):
        raise UserError(f"--train.distributed {d.mode} shards the weights, and this model has frozen ones (a "
                        "parameter-efficient method); use --train.distributed ddp or zero1")
    names = {id(p): name for name, p in model.named_parameters()}
    state = optimizer.state_dict()
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    _shard(model, reshard=d.mode != "zero2", param_dtype=param_dtype)
    return model, _rebuilt(optimizer, model, groups, state)


def _broadcast_weights(model: nn.Module) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _zero1(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with its state sharded across ranks (ZeroRedundancyOptimizer), state restored."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    state = optimizer.state_dict()
    zero = ZeroRedundancyOptimizer([dict(g) for g in optimizer.param_groups], optimizer_class=type(optimizer),
                                   **_constructor_defaults(optimizer))
    if state["state"]:
        zero.load_state_dict(state)
    return zero


def _constructor_defaults(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's defaults that its constructor takes (AdamW records some it does not accept)."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    return {k: v for k, v in optimizer.defaults.items() if k in accepted}


def _shard(model: nn.Module, reshard: bool, param_dtype: torch.dtype | None) -> None:
    """fully_shard each transformer block, then the root (embeddings, head); gradients reduced in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, Block):
            fully_shard(module, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)
    if dist.get_backend() == "gloo":
        # AVG reduce-scatter under gloo has come out summed (pytorch/pytorch#162338): reduce with SUM and let FSDP
        # divide by the world size itself, in every sharded module. The equivalence tests check the scale.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)


def _rebuilt(old: torch.optim.Optimizer, model: nn.Module, groups: list[list[str]], state: dict
             ) -> torch.optim.Optimizer:
    """A new optimizer of the old one's class and groups over the sharded parameters, with the old state sharded."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    new_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [params[n] for n in names]}
                  for g, names in zip(old.param_groups, groups, strict=True)]
    defaults = {k: v for k, v in _constructor_defaults(old).items() if k != "fused"}
    optimizer = type(old)(new_groups, **defaults)  # fused kernels do not take DTensors on every backend
    if state["state"]:
        flat = [p for g in new_groups for p in g["params"]]
        for index, values in state["state"].items():
            p = flat[index]
            for key, value in values.items():
                if isinstance(p, DTensor) and torch.is_tensor(value) and value.shape == p.shape:
                    values[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
        optimizer.load_state_dict(state)
    return optimizer


def sync_gradients(forward_model: nn.Module, d: Dist, last_micro: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients only on a step's last micro-batch: DDP's no_sync, FSDP2's requires_gradient_sync."""
    if not d.active or (last_micro and not d.fsdp):
        return contextlib.nullcontext()
    if d.fsdp:
        forward_model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()
    return forward_model.no_sync()


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """The full weights gathered on rank 0 (None elsewhere); every rank must call it. None when not sharded."""
    if not d.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def full_weights_view(model: nn.Module, full: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within this block model.state_dict() returns the gathered full weights, so a recipe's `save`, written for
    one process, writes the consolidated checkpoint unchanged."""
    if full is None:
        yield
        return
    model.state_dict = lambda *args, **kwargs: dict(full)  # an instance attribute shadows the method
    try:
        yield
    finally:
        del model.state_dict


def full_optimizer_state(optimizer: torch.optim.Optimizer, d: Dist) -> dict | None:
    """The optimizer's full state dict (index-keyed, as one process's) on rank 0, None elsewhere; all ranks call it."""
    if not d.active:
        return optimizer.state_dict()
    if d.mode == "zero1":
        optimizer.consolidate_state_dict(to=0)
        if not d.is_main:
            return None
        state = optimizer.state_dict()
        state["param_groups"] = [{k: v for k, v in g.items() if k in optimizer.optim.defaults or k in
                                  ("params", "base_lr", "initial_lr")} for g in state["param_groups"]]
        return state
    from torch.distributed.tensor import DTensor

    state = optimizer.state_dict()
    for values in state["state"].values():  # same order on every rank: each full_tensor() is a collective
        for key, value in values.items():
            if isinstance(value, DTensor):
                values[key] = value.full_tensor().cpu()
    return state if d.is_main else None


def save_sharded(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist, step: int) -> None:
    """Every rank writes its shards of model + optimizer with DCP into a temporary folder; rank 0 then renames
    it into out_dir/checkpoint_sharded, so a crash never leaves a half-written one there."""
    import torch.distributed.checkpoint as dcp

    folder, tmp = out_dir / SHARDED_DIR, out_dir / f"{SHARDED_DIR}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    d.barrier()
    dcp.save(_dcp_state(model, optimizer, d), checkpoint_id=str(tmp))
    d.barrier()
    if d.is_main:
        (tmp / SHARDED_META).write_text(json.dumps({"step": step, "world_size": d.world, "mode": d.mode}) + "\n")
        old = out_dir / f"{SHARDED_DIR}.old"
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    d.barrier()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict:
    """DCP's view of model (+ optimizer, except ZeRO-1's, whose full state lives in the consolidated folder)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if d.mode == "zero1":
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def sharded_step(out_dir: Path | None, d: Dist) -> int | None:
    """The step of the sharded copy in out_dir that this run can read (an FSDP run reading an FSDP copy; DCP
    reshards across world sizes itself), or None."""
    meta = out_dir / SHARDED_DIR / SHARDED_META if out_dir is not None else None
    if not d.fsdp or meta is None or not meta.is_file():
        return None
    saved = json.loads(meta.read_text())
    return int(saved["step"]) if saved.get("mode") in FSDP_MODES else None


def load_sharded(out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the sharded copy into the sharded model and optimizer; every rank reads only its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(out_dir / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
