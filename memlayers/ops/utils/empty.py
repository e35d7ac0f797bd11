"""Results of ops whose inputs leave nothing to compute (zero rows, no keys, no lookups)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def empty_result(shape: Sequence[int], fill: float, dtype: torch.dtype, device: torch.device,
                 *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """A ``shape`` tensor of ``fill`` that autograd connects to ``inputs``: backward gives each input
    that requires grad a zero gradient of its own shape, as the full computation would.

    The link is the sum of an empty slice of each input (exactly 0, even where the input holds NaN or inf).
    """
    out = torch.full(tuple(shape), fill, dtype=dtype, device=device)
    for x in inputs:
        if x is not None and x.requires_grad:
            out = out + x.reshape(-1)[:0].sum().to(dtype)
    return out
