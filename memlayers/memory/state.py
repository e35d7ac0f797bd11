"""Checks of a ``KNNMemory`` state read from a state dict or a file, made before anything is loaded.

A state is the six buffers (see ``store.py``'s layout) and the capacity: a ``capacity`` entry (or a
shard's ``shard`` entry) where the buffers hold the filled slots only, the slot count in states saved
before that entry existed (they hold every slot). Its batch size and capacity may differ from the
memory it loads into (the memory rebuilds its buffers); everything else must fit, and its contents
must be a state that ``add``/``reset`` can produce, so that a damaged or foreign state never reaches a
search (a NaN key would win every query; a count above the capacity would read past the ring; a
count above the slots held would read slots that are not there).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..ops.utils import FLOAT_DTYPES

STATE_NAMES = ("keys", "values", "positions", "count", "write_ptr", "next_position")
# The per-slot buffers: (name, slot axis, what an empty slot holds).
SLOT_BUFFERS = (("keys", 2, 0), ("values", 2, 0), ("positions", 1, -1))


def _shape_problems(state: Dict[str, torch.Tensor], heads: int, dim: int, value_dim: int, most: int = None) -> List[str]:
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
    if most is not None and C > most:
        return [f"keys has {C} slots, more than {most} (the capacity, or this shard's share of it)"]
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
    if B == 0:
        problems.append(f"keys has shape {tuple(keys.shape)}: the batch size must be positive")
    return problems


def _read_capacity(capacity) -> Tuple[Optional[int], List[str]]:
    """The value of a state's ``capacity`` entry, or the problem with it."""
    if (not isinstance(capacity, torch.Tensor) or capacity.numel() != 1 or capacity.dtype.is_floating_point
            or capacity.dtype == torch.bool):
        return None, [f"capacity must be a one-element integer tensor, got {capacity!r}"]
    value = int(capacity.item())
    return (value, []) if value > 0 else (None, [f"capacity must be positive, got {value}"])


def _content_problems(state: Dict[str, torch.Tensor], slot_ids: torch.Tensor, C: int, stripe=None) -> List[str]:
    count, write_ptr = state["count"].cpu(), state["write_ptr"].cpu()
    positions, next_position = state["positions"].cpu(), state["next_position"].cpu()
    problems = []
    if bool(((count < 0) | (count > C)).any()):
        problems.append(f"count holds {count.tolist()}, outside 0..{C} (the capacity)")
        return problems
    held = count if stripe is None else stripe.local_count(count)  # the slots here that hold an entry
    if bool((held > slot_ids.numel()).any()):
        problems.append(f"count holds {count.tolist()}: more entries than the {slot_ids.numel()} slots the state holds")
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


def check_state(state: Dict[str, torch.Tensor], heads: int, dim: int, value_dim: int, stripe=None,
                capacity: Optional[torch.Tensor] = None) -> Tuple[int, int]:
    """``(batch_size, capacity)`` of a state that fits a memory of these heads and dims.

    ``stripe``: for one rank's shard of a sharded memory (``sharding.Stripe``), whose buffers hold
    that rank's slots and whose count, write pointer and positions are global. ``capacity``: the
    state's ``capacity`` entry (None: there is none; with a stripe it must agree with it).
    Raises ``ValueError`` listing every problem found (all shapes first, then contents).
    """
    missing = [name for name in STATE_NAMES if name not in state]
    if missing:
        raise ValueError(f"the state lacks {missing}")
    C, problems = (None, []) if capacity is None else _read_capacity(capacity)
    if stripe is not None:
        if C is not None and C != stripe.capacity:
            problems.append(f"capacity is {C}, but the shard entry names {stripe.capacity}")
        C, most = stripe.capacity, stripe.local_capacity
    else:
        most = C
    problems = problems or _shape_problems(state, heads, dim, value_dim, most)
    if not problems:
        slots = state["keys"].shape[2]
        slot_ids = torch.arange(slots)
        if stripe is not None:  # padding slots past the capacity get ids >= C: never valid
            slot_ids = slot_ids * stripe.world + stripe.rank
        if C is None:  # saved before the capacity entry: every slot of the capacity
            C = slots
            problems = [] if slots > 0 else ["keys holds no slots and the state names no capacity"]
        problems = problems or _content_problems(state, slot_ids, C, stripe)
    if problems:
        raise ValueError("; ".join(problems))
    return state["keys"].shape[0], C


def fit_slots(state: Dict[str, torch.Tensor], slots: int) -> Dict[str, torch.Tensor]:
    """``state`` (checked) with ``slots`` slots: cut to them (those cut hold nothing: ``slots`` covers
    every count) or padded with empty slots (zero keys and values, position -1)."""
    have = state["keys"].shape[2]
    if have == slots:
        return state
    out = dict(state)
    for name, axis, empty in SLOT_BUFFERS:
        t = state[name]
        if have > slots:
            out[name] = t.narrow(axis, 0, slots)
            continue
        shape = list(t.shape)
        shape[axis] = slots - have
        out[name] = torch.cat([t, t.new_full(shape, empty)], dim=axis)
    return out


def cat_rows(states: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """One state whose rows are those of ``states`` (states of one memory's capacity, as its
    ``state_dict`` gives them), in order: slot buffers padded to the most slots any of them holds,
    the other entries (``capacity``) taken from the first."""
    slots = max(s["keys"].shape[2] for s in states)
    fitted = [fit_slots(s, slots) for s in states]
    out = dict(states[0])
    out.update({name: torch.cat([f[name] for f in fitted]) for name in STATE_NAMES})
    return out
