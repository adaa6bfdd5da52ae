"""Helpers for sharded training (FSDP) with `LTETrainer`.

Under FSDP a process holds only a shard of each parameter: FSDP2 (`fully_shard`, what
`configs/accelerate/fsdp.yaml` selects) keeps the module tree and turns parameters into DTensor
shards; FSDP1 wraps modules in `FullyShardedDataParallel` units and flattens their parameters. The
LTE save, the checkpoint reload and the checks below therefore go through a *full* state dict,
gathered on rank 0 or broadcast from it by `torch.distributed.checkpoint.state_dict`, which reads
and writes both FSDP versions. Buffers (the permutations and expert sizes) are not sharded.

Every function that communicates must be called by every process of the group, in the same order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lte.checkpoint import state_dict_name

__all__ = ["is_sharded", "gather_full_state_dict", "load_full_state_dict", "state_dict_names",
           "broadcast_from_rank0", "ranks_agree"]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` (or a module inside it) is sharded by FSDP (version 1 or 2)."""
    if not dist.is_available():
        return False
    import torch.distributed.fsdp as fsdp

    kinds = tuple(getattr(fsdp, name) for name in ("FSDPModule", "FullyShardedDataParallel") if hasattr(fsdp, name))
    return any(isinstance(m, kinds) for m in model.modules())


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of a sharded `model`, on CPU on rank 0; `{}` on the other ranks.

    Collective: every process must call it. Keys are the unwrapped model's own (no FSDP prefixes).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a full state dict held by rank 0 (`{}` elsewhere) into the shards of `model`, every rank.

    Collective: every process must call it. Parameters and buffers are broadcast from rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state_dict,
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True))


def state_dict_names(model: nn.Module) -> set[str]:
    """The keys `model.state_dict()` has when unsharded: parameters (tied ones under each name) and
    persistent buffers, read from the module tree without communicating."""
    names = {state_dict_name(name) for name, _ in model.named_parameters(remove_duplicate=False)}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in module._non_persistent_buffers_set:
                names.add(state_dict_name(f"{prefix}.{name}" if prefix else name))
    return names


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` (any picklable object) on every rank; `value` itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ranks_agree(values: torch.Tensor) -> bool:
    """Whether every process holds exactly the same small float tensor (compared by max and min)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return True
    high, low = values.clone(), values.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))
