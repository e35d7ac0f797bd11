"""The memory-state protocol: one contract for every memory in memlayers.

A *memory module* is an ``nn.Module`` whose runtime state (what it has memorized) lives in its own
registered buffers, per batch row where the state is per row. Because the state is made of buffers:

- ``module.to(device|dtype)`` moves it with the module;
- ``module.state_dict()`` / ``load_state_dict()`` save and load it (a load validates what it reads and
  changes nothing when it fails);
- a model's memories are found by walking its modules (``memory_modules(model)``), never through a
  side object.

On top of that every memory module answers three calls:

- ``reset_memory(rows=None)``: forget the chosen batch rows (None: all), leaving the others bit for
  bit as they were. A reset row is a fresh start, whatever its history was.
- ``bind_batch(batch_size)``: give the state ``batch_size`` empty rows (memory modules whose state is
  not per row, e.g. learned value tables, accept any batch size and change nothing).
- ``memory_batch_size``: the batch rows the state holds now (None when it holds no per-row state).

Row selectors are read by ``row_mask`` only, so every memory understands the same ones.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
from torch import nn


def row_mask(rows, batch_size: int, device=None, name: str = "rows") -> torch.Tensor:
    """The ``[batch_size]`` boolean mask that a row selector names.

    Args:
        rows: None (every row); an int row id; a sequence or 1-D tensor of int row ids (negative ids
            count from the end, as in Python); or a 1-D boolean mask (a tensor, or a list/tuple of
            bools) of length ``batch_size``.
        batch_size: the rows there are.
        device: where the mask is made (default CPU).
        name: the argument's name in error messages.

    Raises ``TypeError`` for floats, complex numbers or mixed bools and ints, ``ValueError`` for a
    mask of the wrong length or an id out of range. Reads nothing but ``rows``: call it before any
    state changes.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if rows is None:
        return torch.ones(batch_size, dtype=torch.bool, device=device)
    if isinstance(rows, bool):
        raise TypeError(f"{name} must be row ids or a boolean mask of length {batch_size}, got the bool {rows}")
    if isinstance(rows, int):
        rows = [rows]
    if isinstance(rows, (list, tuple)):
        kinds = {type(r) for r in rows}
        if kinds and kinds <= {bool}:
            rows = torch.tensor(rows, dtype=torch.bool)
        elif kinds and not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
            bad = next(r for r in rows if not (isinstance(r, int) and not isinstance(r, bool)))
            raise TypeError(f"{name} must hold only int row ids or only bools, got {bad!r}")
        else:
            rows = torch.tensor(rows, dtype=torch.long)
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"{name} must be None, an int, a sequence of ints, or a 1-D tensor, got {type(rows).__name__}")
    if rows.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(rows.shape)}")
    if rows.dtype == torch.bool:
        if rows.shape[0] != batch_size:
            raise ValueError(f"{name} as a boolean mask must have length {batch_size}, got {rows.shape[0]}")
        return rows.to(device)
    if rows.is_floating_point() or rows.is_complex():
        raise TypeError(f"{name} must be integer row ids or a boolean mask, got dtype {rows.dtype}")
    ids = rows.to(torch.long).cpu()
    if ids.numel() and (int(ids.min()) < -batch_size or int(ids.max()) >= batch_size):
        raise ValueError(f"{name} must be row ids in {-batch_size}..{batch_size - 1}, got {ids.tolist()}")
    mask = torch.zeros(batch_size, dtype=torch.bool)
    mask[ids % max(batch_size, 1)] = True
    return mask.to(device)


class MemoryModule:
    """Mixin that marks an ``nn.Module`` as a memory module (see the module docstring).

    Subclasses keep their state in registered buffers and implement ``reset_memory``,
    ``bind_batch`` and ``memory_batch_size``.
    """

    def reset_memory(self, rows=None) -> None:
        raise NotImplementedError

    def bind_batch(self, batch_size: int) -> None:
        raise NotImplementedError

    @property
    def memory_batch_size(self) -> Optional[int]:
        raise NotImplementedError


def memory_modules(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    """``(name, module)`` for every memory module inside ``model`` (``model`` included), outermost
    first. A memory module inside another (a ``KNNMemory`` inside ``KNNMemoryAttention``) is listed
    too; a reset through the outer one resets the inner one, and resetting twice is harmless."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, MemoryModule):
            yield name, module


__all__ = ["MemoryModule", "memory_modules", "row_mask"]
