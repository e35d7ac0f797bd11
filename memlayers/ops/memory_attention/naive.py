"""Retrieval attention in plain PyTorch: the specification of the Triton kernel and the CPU path.

For query ``q[b, h, t]`` (kv-head ``hk = h // (Hq // Hkv)``) and its retrieved slots
``j = indices[b, h, t, :]`` (``-1`` = missing):

    key_j   = mem_keys[b, hk, j]                      (rotated at mem_positions[b, j] when tables are given:
                                                       key_j * cos[p] + rotate_half(key_j) * sin[p])
    s_j     = scale * q . key_j                       (-inf where missing)
    lse     = log sum_j exp(s_j)                      (-inf when every slot is missing)
    out     = sum_j exp(s_j - lse) * mem_values[b, hk, j]   (0 when every slot is missing)

Everything is computed in fp32; ``out`` is returned in q's dtype, ``lse`` in fp32. This path gathers a
``[B, Hq, T, k, D]`` tensor (the "torch gather" baseline); the Triton kernel never does.

``merge_attention_naive`` combines two partial softmaxes over disjoint key sets into the joint softmax.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF convention: ``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _gather_rows(buf: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
    # buf [B, Hkv, C, E], safe [B, Hq, T, k] -> [B, Hq, T, k, E]. Query head h = hk * G + g reads
    # kv-head hk, so (G, T, k) folds into one index axis per kv-head and no head is duplicated.
    B, Hq, T, k = safe.shape
    Hkv, E = buf.shape[1], buf.shape[3]
    idx = safe.reshape(B, Hkv, -1, 1).expand(-1, -1, -1, E)
    return buf.gather(2, idx).reshape(B, Hq, T, k, E)


def memory_attention_naive(
    q: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    indices: torch.Tensor,
    scale: float,
    mem_positions: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, T, D], mem_keys [B, Hkv, C, D], mem_values [B, Hkv, C, Dv], indices [B, Hq, T, k]
    -> (out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32). Inputs are assumed validated."""
    B, Hq, T, _ = q.shape
    valid = indices >= 0
    safe = indices.clamp_min(0).long()
    keys = _gather_rows(mem_keys.float(), safe)
    values = _gather_rows(mem_values.float(), safe)
    if rotary_cos is not None:
        pos = mem_positions.gather(1, safe.reshape(B, -1)).reshape(safe.shape).clamp_min(0)
        keys = keys * rotary_cos.float()[pos] + rotate_half(keys) * rotary_sin.float()[pos]

    scores = torch.einsum("bhtd,bhtkd->bhtk", q.float(), keys) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    m = scores.amax(dim=-1)
    # A query with no valid memory has m = -inf; shifting by 0 instead keeps exp() finite (all zeros).
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m[..., None])
    l = p.sum(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    out = torch.einsum("bhtk,bhtkd->bhtd", p, values) / l.clamp_min(tiny)[..., None]
    # l == 0: no valid memory (lse -inf); a NaN score (NaN query) leaves NaN in out and lse alike.
    lse = torch.where(l == 0, torch.full_like(l, float("-inf")), m + torch.log(l.clamp_min(tiny)))
    return out.to(q.dtype), lse


def merge_attention_naive(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out_a/out_b [..., Dv], lse_a/lse_b [...] -> (out [..., Dv] in out_a's dtype, lse [...] fp32 or fp64).

    ``out = (e^lse_a out_a + e^lse_b out_b) / (e^lse_a + e^lse_b)``, shifted by the larger lse so that
    nothing overflows; both empty (-inf) gives out = 0, lse = -inf, with finite gradients.
    """
    dt = torch.promote_types(torch.promote_types(lse_a.dtype, lse_b.dtype), torch.float32)
    lse_a, lse_b = lse_a.to(dt), lse_b.to(dt)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m)
    wb = torch.exp(lse_b - m)
    total = wa + wb
    tiny = torch.finfo(dt).tiny
    inv = 1.0 / total.clamp_min(tiny)
    out = out_a.to(dt) * (wa * inv)[..., None] + out_b.to(dt) * (wb * inv)[..., None]
    lse = torch.where(total > 0, m + torch.log(total.clamp_min(tiny)), torch.full_like(total, float("-inf")))
    return out.to(out_a.dtype), lse
