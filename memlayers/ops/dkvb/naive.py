"""Discrete key-value lookup in plain PyTorch: the specification of the Triton kernel and the CPU path.

For every input row b and codebook c:
    dist[n]        = ||keys[c, n]||^2 - 2 queries[b, c] . keys[c, n]   (squared L2 up to ||q||^2, fp32)
    indices[b, c]  = the ``k`` keys of smallest dist, nearest first (keys with key_mask False skipped)
    out[b, c]      = mean_j values[c, indices[b, c, j]]
Only ``values`` is differentiable: the nearest-key choice is piecewise constant, and in the DKVB the
keys are frozen by design. Codebooks are processed in chunks so that the ``[chunk, B, N]`` distance
block stays near 64M elements.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

DIST_BLOCK_ELEMENTS = 1 << 26


def dkvb_distances(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """queries [B, C, Dk], keys [C, N, Dk] -> [C, B, N] fp32 squared distances minus ||q||^2."""
    k = keys.float()
    dots = torch.einsum("bcd,cnd->cbn", queries.float(), k)
    return k.pow(2).sum(-1)[:, None, :] - 2.0 * dots


def dkvb_lookup_naive(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k: int = 1,
    key_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [B, C, Dk], keys [C, N, Dk], values [C, N, Dv] -> (out [B, C, Dv], indices [B, C, k] int64)."""
    B, C, _ = queries.shape
    N = keys.shape[1]
    chunk = max(1, DIST_BLOCK_ELEMENTS // max(1, B * N))
    idx_parts = []
    for c0 in range(0, C, chunk):
        d = dkvb_distances(queries[:, c0 : c0 + chunk], keys[c0 : c0 + chunk])
        if key_mask is not None:
            d = d.masked_fill(~key_mask[c0 : c0 + chunk, None, :], float("inf"))
        idx_parts.append(torch.topk(d, k, dim=-1, largest=False, sorted=True).indices)
    indices = torch.cat(idx_parts, dim=0).permute(1, 0, 2)  # [B, C, k]
    codebook = torch.arange(C, device=values.device)[None, :, None]
    fetched = values.float()[codebook, indices]  # [B, C, k, Dv]; autograd scatters into hit rows only
    return fetched.mean(dim=2).to(values.dtype), indices
