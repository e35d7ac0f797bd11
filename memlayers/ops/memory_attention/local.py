"""Local causal attention that also returns its log-sum-exp, for an exact joint softmax with the
retrieved memories (``merge_attention``). Plain PyTorch, differentiable through both outputs.

SDPA does not return the log-sum-exp, and the joint merge needs its gradient too, so this computes
the scores explicitly, a chunk of queries at a time so that a score block stays near 2^26 elements.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..utils import FLOAT_DTYPES, check_same_device, check_tensor

SCORE_BLOCK_ELEMENTS = 1 << 26


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    prefix_valid: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of T queries over ``S = P + T`` keys: a prefix of P keys (e.g. the previous
    segment) that every query sees, then the T keys of the queries themselves, causally.

    Args:
        q: ``[B, Hq, T, D]``; k: ``[B, Hkv, S, D]``; v: ``[B, Hkv, S, Dv]`` (same dtype; ``Hq`` a
            multiple of ``Hkv``, grouped-query), ``S >= T``.
        scale: default ``D ** -0.5``.
        prefix_valid: optional ``[B]`` bool: rows where the P prefix keys are hidden are False.

    Returns:
        ``(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32)``; computed in fp32.

    Example:
        >>> import torch
        >>> from memlayers.ops.memory_attention import local_attention
        >>> q, k, v = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
        >>> out, lse = local_attention(q, k, v)
        >>> out.shape, lse.shape
        (torch.Size([1, 4, 10, 16]), torch.Size([1, 4, 10]))
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, Hq, T, D = q.shape
    check_tensor("k", k, shape=(B, None, None, D), dtypes=(q.dtype,))
    Hkv, S = k.shape[1], k.shape[2]
    check_tensor("v", v, shape=(B, Hkv, S, None), dtypes=(q.dtype,))
    check_same_device(q=q, k=k, v=v, prefix_valid=prefix_valid)
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of k's head count ({Hkv})")
    if S < T:
        raise ValueError(f"k must hold at least the T={T} keys of the queries, got S={S}")
    if prefix_valid is not None:
        check_tensor("prefix_valid", prefix_valid, shape=(B,), dtypes=(torch.bool,))
    scale = D ** -0.5 if scale is None else scale
    P, G = S - T, Hq // Hkv
    if T == 0:
        return q.new_zeros(B, Hq, 0, v.shape[3]), torch.zeros(B, Hq, 0, device=q.device)

    qf = q.float().reshape(B, Hkv, G, T, D)
    kf = k.float()[:, :, None]
    vf = v.float()[:, :, None]
    key = torch.arange(S, device=q.device)
    outs, lses = [], []
    chunk = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * Hq * S))
    for t0 in range(0, T, chunk):
        qc = qf[:, :, :, t0:t0 + chunk]
        rows = torch.arange(t0, t0 + qc.shape[3], device=q.device)
        visible = key[None, :] <= rows[:, None] + P  # [t, S]: the prefix, then causal
        visible = visible[None].expand(B, -1, -1)
        if prefix_valid is not None and P:
            visible = visible & ((key >= P)[None, None, :] | prefix_valid[:, None, None])
        s = torch.matmul(qc, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, t, S]
        s = s.masked_fill(~visible[:, None, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # every query sees at least itself: finite
        outs.append(torch.matmul(torch.exp(s - lse[..., None]), vf))
        lses.append(lse)
    out = torch.cat(outs, dim=3).reshape(B, Hq, T, -1)
    lse = torch.cat(lses, dim=3).reshape(B, Hq, T)
    return out.to(q.dtype), lse
