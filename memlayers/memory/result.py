"""The result of a memory search."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class KNNSearchResult:
    """Top-k memories of each query, best first.

    Attributes:
        scores: ``[B, Hq, T, k]`` fp32 (``-inf`` where missing).
        indices: ``[B, Hq, T, k]`` int64 slot ids in the memory buffers (``-1`` where missing).
        positions: ``[B, Hq, T, k]`` int64 absolute token positions of the memories (``-1`` where missing).
        mask: ``[B, Hq, T, k]`` bool, True for a valid memory.
        keys: ``[B, Hq, T, k, D]`` gathered keys (zeros where missing), or None for ``gather=False``.
        values: ``[B, Hq, T, k, Dv]`` gathered values (zeros where missing), or None for ``gather=False``.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
