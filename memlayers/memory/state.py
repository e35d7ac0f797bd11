"""Checks of a ``KNNMemory`` state read from a state dict or a file, made before anything is loaded.

A state is the six buffers (see ``store.py``'s layout). Its batch size and capacity may differ from the
memory it loads into (the memory rebuilds its buffers); everything else must fit, and its contents
must be a state that ``add``/``reset`` can produce, so that a damaged or foreign state never reaches a
search (a NaN key would win every query; a count above the capacity would read past the ring).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..ops.utils import FLOAT_DTYPES

STATE_NAMES = ("keys", "values", "positions", "count", "write_ptr", "next_position")


def _shape_problems(state: Dict[str, torch.Tensor], heads: int, dim: int, value_dim: int, slots: int = None) -> List[str]:
    keys, values = state["keys"], state["values"]
    problems = []
    for name in STATE_NAMES:
        if not isinstance(state[name], torch.Tensor):
            problems.append(f"{name} is a {type(state[name]).__name__}, not a tensor")
    if problems:
        return problems
    if keys.dim() != 4 or tuple(keys.shape[1:2]) + tuple(keys.shape[3:]) != (heads, dim):
        return [f"keys has shape {tuple(keys.shape)}, expected (batch, {heads}, capacity, {dim})"]
    B, C = keys.shape[0], keys.shape[2]
    if slots is not None and C != slots:
        return [f"keys has {C} slots, expected {slots} (this shard's share of the capacity)"]
    expected = {"values": (B, heads, C, value_dim), "positions": (B, C), "count": (B,), "write_ptr": (B,),
                "next_position": (B,)}
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(state[name].shape)}, expected {shape}")
    for name in ("keys", "values"):
        if state[name].dtype not in FLOAT_DTYPES:
            problems.append(f"{name} has dtype {state[name].dtype}, expected one of {[str(d) for d in FLOAT_DTYPES]}")
    for name in STATE_NAMES[2:]:
        if state[name].dtype != torch.int64:
            problems.append(f"{name} has dtype {state[name].dtype}, expected torch.int64")
    if B == 0 or C == 0:
        problems.append(f"keys has shape {tuple(keys.shape)}: batch size and capacity must be positive")
    return problems


def _content_problems(state: Dict[str, torch.Tensor], slot_ids: torch.Tensor, C: int) -> List[str]:
    count, write_ptr = state["count"].cpu(), state["write_ptr"].cpu()
    positions, next_position = state["positions"].cpu(), state["next_position"].cpu()
    problems = []
    if bool(((count < 0) | (count > C)).any()):
        problems.append(f"count holds {count.tolist()}, outside 0..{C} (the capacity)")
        return problems
    if bool(((write_ptr < 0) | (write_ptr >= C)).any()):
        problems.append(f"write_ptr holds {write_ptr.tolist()}, outside 0..{C - 1}")
    # Until a row's ring is full it fills slots 0..count-1 in order: its write pointer is its count.
    filling = count < C
    if bool((write_ptr[filling] != count[filling]).any()):
        problems.append(f"write_ptr {write_ptr.tolist()} disagrees with count {count.tolist()} "
                        f"(a ring that is not full writes slot count next)")
    valid = slot_ids[None, :] < count[:, None]
    if bool((positions[valid] < 0).any()) or bool((positions[~valid] != -1).any()):
        problems.append("positions are not >= 0 exactly in the valid slots 0..count-1 and -1 elsewhere")
    if bool((next_position < 0).any()):
        problems.append(f"next_position holds {next_position.tolist()}, expected non-negative values")
    for name in ("keys", "values"):
        if not bool(torch.isfinite(state[name]).all()):
            problems.append(f"{name} holds non-finite values (NaN or inf)")
    return problems


def check_state(state: Dict[str, torch.Tensor], heads: int, dim: int, value_dim: int, stripe=None) -> Tuple[int, int]:
    """``(batch_size, capacity)`` of a state that fits a memory of these heads and dims.

    ``stripe``: for one rank's shard of a sharded memory (``sharding.Stripe``), whose buffers hold
    that rank's slots and whose count, write pointer and positions are global.
    Raises ``ValueError`` listing every problem found (all shapes first, then contents).
    """
    missing = [name for name in STATE_NAMES if name not in state]
    if missing:
        raise ValueError(f"the state lacks {missing}")
    slots = None if stripe is None else stripe.local_capacity
    problems = _shape_problems(state, heads, dim, value_dim, slots)
    if not problems:
        C = state["keys"].shape[2] if stripe is None else stripe.capacity
        slot_ids = torch.arange(state["keys"].shape[2])
        if stripe is not None:  # padding slots past the capacity get ids >= C: never valid
            slot_ids = slot_ids * stripe.world + stripe.rank
        problems = _content_problems(state, slot_ids, C)
    if problems:
        raise ValueError("; ".join(problems))
    return state["keys"].shape[0], state["keys"].shape[2] if stripe is None else stripe.capacity
