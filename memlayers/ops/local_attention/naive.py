"""Local causal attention with its log-sum-exp in plain PyTorch: the specification of the Triton
kernel and the CPU path.

Query ``t`` of ``T`` (kv-head ``hk = h // (Hq // Hkv)``) sees the ``S = P + T`` keys ``j`` with

    j <= t + P                       (the P prefix keys, then its own segment causally)
    and (j >= P or prefix_valid[b])  (a row whose prefix is hidden sees its segment only)

    s_j = scale * q . k_j,   lse = log sum_j exp(s_j),   out = sum_j exp(s_j - lse) v_j

Every query sees at least its own key, so ``lse`` is always finite. Computed in fp32; ``out`` is
returned in q's dtype, ``lse`` in fp32. Scores are formed explicitly, a chunk of queries at a time so
that a score block stays near 2^26 elements.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

SCORE_BLOCK_ELEMENTS = 1 << 26


def local_attention_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    prefix_valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv], prefix_valid [B] bool or None
    -> (out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32). Inputs are assumed validated, T >= 1."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P, G = S - T, Hq // Hkv
    # Query head h = hk * G + g reads kv-head hk: each chunk's (G, t) queries are one row axis per
    # kv-head, so k and v are read as they are (a broadcast over G would copy them G times).
    qf = q.float().reshape(B, Hkv, G, T, D)
    kt = k.float().transpose(-1, -2)
    vf = v.float()
    key = torch.arange(S, device=q.device)
    outs, lses = [], []
    chunk = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * Hq * S))
    for t0 in range(0, T, chunk):
        qc = qf[:, :, :, t0:t0 + chunk]
        t = qc.shape[3]
        rows = torch.arange(t0, t0 + t, device=q.device)
        visible = key[None, :] <= rows[:, None] + P  # [t, S]: the prefix, then causal
        visible = visible[None].expand(B, -1, -1)
        if prefix_valid is not None and P:
            visible = visible & ((key >= P)[None, None, :] | prefix_valid[:, None, None])
        s = torch.matmul(qc.reshape(B, Hkv, G * t, D), kt).view(B, Hkv, G, t, S) * scale
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # every query sees at least itself: finite
        p = torch.exp(s - lse[..., None]).view(B, Hkv, G * t, S)
        outs.append(torch.matmul(p, vf).view(B, Hkv, G, t, -1))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, -1)
    lse = torch.cat(lses, dim=3).reshape(B, Hq, T)
    return out.to(q.dtype), lse
