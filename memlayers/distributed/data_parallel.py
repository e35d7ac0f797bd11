"""Data-parallel training with memories: each rank keeps its own, the trainable parts synchronize.

A model's memories are registered buffers (the memory-state protocol, ``memlayers.memory.protocol``),
and each rank's memories hold what *its* batch rows have seen. Two torch wrappers would erase that:

- ``DistributedDataParallel`` broadcasts every buffer from rank 0 when it is built and, with its default
  ``broadcast_buffers=True``, before every forward. Buffers it is told to ignore (torch's
  ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``, names fixed when DDP is
  built) are never broadcast: ``prepare_ddp`` names every memory buffer there, including those a layer
  builds later (its ``memory`` is made by the first forward, or here by ``batch_size``).
- FSDP2 ``fully_shard`` shards parameters only (buffers stay plain per-rank tensors), so memories are
  safe; the one thing it must not touch is a parameter that already differs per rank, the value table
  of a sharded ``ProductKeyMemory``: pass ``prepare_fully_shard``'s set as ``ignored_params``.

Per-rank tensors are the buffers (present or future) inside memory modules with per-row state, and the
value shards of sharded product-key memories (their gradient is averaged by the layer itself).
Learned-table memories (DKVB, unsharded PKM) are weights, trained and synchronized like any other.
A functional ``NeuralMemory`` keeps its state outside the module (``mem(x, state, return_state=True)``):
it stays per rank by construction; ``StatefulNeuralMemory`` keeps it in buffers, which are named here.
"""
from __future__ import annotations

from typing import List, Optional, Set

from torch import nn

from ..layers.learned_memory import LearnedMemory
from ..memory.protocol import memory_modules
from ..ops.utils import check_positive_int


def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model.module if isinstance(model, DistributedDataParallel) else model


def bind_memories(model: nn.Module, batch_size: Optional[int]) -> None:
    """Build every unbuilt memory for ``batch_size`` rows (None: they must all be built already)."""
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    unbuilt = [name or "(root)" for name, m in memory_modules(_unwrap(model))
               if not isinstance(m, LearnedMemory) and m.memory_batch_size is None]
    if unbuilt and batch_size is None:
        raise ValueError(f"the memories of {unbuilt} are not built yet: pass batch_size (this rank's batch rows) "
                         "so that their buffers exist, and are named, before the model is wrapped")
    for name, m in memory_modules(_unwrap(model)):
        if not isinstance(m, LearnedMemory) and m.memory_batch_size is None:
            m.bind_batch(batch_size)


def sharded_parameters(model: nn.Module) -> List[str]:
    """Names of the parameters that hold a different shard on each rank (sharded PKM value tables)."""
    from ..layers.pkm import ProductKeyMemory

    names = []
    for prefix, m in _unwrap(model).named_modules():
        if isinstance(m, ProductKeyMemory) and m.process_group is not None:
            names.append(f"{prefix}.values" if prefix else "values")
    return names


def per_rank_names(model: nn.Module) -> List[str]:
    """Fully qualified names of every per-rank tensor of ``model``: the buffers of its memories with
    per-row state (those a buffer slot is registered for but not filled yet included, e.g. a
    Transformer-XL segment made by the first forward) and its sharded parameters."""
    names = set(sharded_parameters(model))
    for prefix, m in memory_modules(_unwrap(model)):
        if isinstance(m, LearnedMemory):
            continue
        for sub_prefix, sub in m.named_modules():
            owner = ".".join(p for p in (prefix, sub_prefix) if p)
            for buffer in sub._buffers:  # every registered slot, the empty (None) ones too
                names.add(f"{owner}.{buffer}" if owner else buffer)
    return sorted(names)


def prepare_ddp(model: nn.Module, batch_size: Optional[int] = None) -> nn.Module:
    """Make ``DistributedDataParallel(model)`` keep each rank's memories; call it before wrapping.

    Args:
        model: the unwrapped model.
        batch_size: this rank's batch rows, to build memories that are not built yet (a
            ``KNNMemoryAttention`` builds its memory on its first forward; DDP must know the
            buffers' names when it is made). Not needed when every memory is built.

    Every per-rank tensor (``per_rank_names``) is marked ignored through torch's
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model`` (names already marked are
    kept): DDP never broadcasts the memories, at construction or before a forward, and never
    all-reduces a sharded table; every other parameter and buffer synchronizes as usual.
    Returns ``model``.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise TypeError("prepare_ddp takes the model before it is wrapped: DDP reads the names to ignore when built")
    bind_memories(model, batch_size)
    names = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(per_rank_names(model))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(names))
    return model


def prepare_fully_shard(model: nn.Module, batch_size: Optional[int] = None) -> Set[nn.Parameter]:
    """Build unbuilt memories (see ``prepare_ddp``) and return the parameters FSDP2 must leave alone:
    ``fully_shard(model, ignored_params=prepare_fully_shard(model, batch_size))``."""
    bind_memories(model, batch_size)
    params = dict(_unwrap(model).named_parameters(remove_duplicate=False))  # a shared table under each name
    return {params[name] for name in sharded_parameters(model)}


__all__ = ["bind_memories", "per_rank_names", "prepare_ddp", "prepare_fully_shard", "sharded_parameters"]
