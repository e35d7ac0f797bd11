"""Discrete key-value lookup in plain PyTorch: the specification of the Triton kernel and the CPU path.

For every input row b and codebook c:
    dist[n]        = ||keys[c, n]||^2 - 2 queries[b, c] . keys[c, n]   (squared L2 up to ||q||^2, fp32)
    indices[b, c]  = the ``k`` keys of smallest dist, nearest first (keys with key_mask False skipped)
    out[b, c]      = mean_j values[c, indices[b, c, j]]
Non-finite distances: NaN counts as +inf, and a key at +inf distance is no match. A pick that finds
no match has index -1 and makes its output row NaN (e.g. every pick of a query row holding NaN).
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
    idx_parts = [torch.empty((0, B, k), dtype=torch.long, device=values.device)]
    for c0 in range(0, C, chunk):
        d = dkvb_distances(queries[:, c0 : c0 + chunk], keys[c0 : c0 + chunk])
        torch.nan_to_num_(d, nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
        if key_mask is not None:
            d.masked_fill_(~key_mask[c0 : c0 + chunk, None, :], float("inf"))
        top = torch.topk(d, k, dim=-1, largest=False, sorted=True)
        idx_parts.append(top.indices.masked_fill(top.values == float("inf"), -1))
    indices = torch.cat(idx_parts, dim=0).permute(1, 0, 2)  # [B, C, k]
    codebook = torch.arange(C, device=values.device)[None, :, None]
    fetched = values.float()[codebook, indices.clamp_min(0)]  # [B, C, k, Dv]; autograd scatters into hit rows only
    found = (indices >= 0).all(dim=-1, keepdim=True)
    out = torch.where(found, fetched.mean(dim=2), float("nan"))  # a row with a missing pick: NaN, no gradient
    return out.to(values.dtype), indices
