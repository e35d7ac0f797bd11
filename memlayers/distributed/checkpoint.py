"""``torch.distributed.checkpoint`` (DCP) with per-rank memories.

DCP treats a plain tensor that every rank saves under the same key as replicated and writes one copy:
every rank's memory would come back as one rank's. ``state_dict`` therefore gives each per-rank entry
(everything a memory with per-row state saves, and sharded value tables) a key of its own rank,
``"<name>@rank<r>"``; the rest (replicated weights, FSDP2's DTensor shards) keeps its name and DCP
handles it as usual. ``load_state_dict`` maps the keys back and loads through the model's own
``load_state_dict``, so every memory checks what it reads and rebuilds its host-side state.

``save(model, path)`` / ``load(model, path)`` do both with DCP's file system storage. ``load`` reads the
per-rank entries into fresh tensors of the saved shapes (from the checkpoint's metadata), so the
memories need not be built, nor bound to the saved batch size, beforehand (nothing live is written
before the model's own checks pass). A checkpoint restores onto the same number of ranks (rank r's
memories onto rank r).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from ..layers.learned_memory import LearnedMemory
from ..memory.protocol import memory_modules
from .data_parallel import _unwrap, sharded_parameters


def _rank_key(name: str, rank: int) -> str:
    return f"{name}@rank{rank}"


def _is_per_rank(model: nn.Module, keys) -> Dict[str, bool]:
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    sharded = set(sharded_parameters(model))
    # Everything a memory with per-row state saves (buffers, a shard's tag, FAISS blobs) but its weights.
    prefixes = [f"{name}." if name else "" for name, m in memory_modules(model) if not isinstance(m, LearnedMemory)]
    return {k: k in sharded or (k not in params and any(k.startswith(p) for p in prefixes)) for k in keys}


def state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model``'s state dict (unwrapped from DDP) with this rank's memories under per-rank keys."""
    inner = _unwrap(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    full = inner.state_dict()
    mine = _is_per_rank(inner, full)
    return {(_rank_key(k, rank) if mine[k] else k): v for k, v in full.items()}


def load_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], strict: bool = True):
    """Load what ``state_dict`` gave (after ``dcp.load`` filled it) into ``model``; returns
    ``load_state_dict``'s result. Raises ``ValueError`` for another rank's entries."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    suffix = f"@rank{rank}"
    others = [k for k in state_dict if "@rank" in k and not k.endswith(suffix)]
    if others:
        raise ValueError(f"state_dict holds other ranks' entries ({others[:3]}...); this is rank {rank}: load the "
                         "dict that state_dict(model) made on this rank")
    plain = {(k[: -len(suffix)] if k.endswith(suffix) else k): v for k, v in state_dict.items()}
    return _unwrap(model).load_state_dict(plain, strict=strict)


def save(model: nn.Module, checkpoint_id) -> None:
    """``dcp.save(state_dict(model), checkpoint_id=checkpoint_id)``: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state_dict(model), checkpoint_id=checkpoint_id)


def load(model: nn.Module, checkpoint_id, strict: bool = True):
    """Restore what ``save`` wrote into ``model`` (every rank calls it); returns ``load_state_dict``'s result."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    rank = dist.get_rank() if dist.is_initialized() else 0
    suffix = f"@rank{rank}"
    saved = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    live = state_dict(model)
    home = next(_unwrap(model).parameters(), torch.empty(0)).device  # where a memory not built yet would live
    sd = {k: v for k, v in live.items() if not k.endswith(suffix)}
    for key, meta in saved.items():
        if key.endswith(suffix) and isinstance(meta, TensorStorageMetadata):
            device = live[key].device if key in live else home
            sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
    dcp.load(sd, checkpoint_id=checkpoint_id)
    return load_state_dict(model, sd, strict=strict)


__all__ = ["load", "load_state_dict", "save", "state_dict"]
