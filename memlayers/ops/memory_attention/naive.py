"""Retrieval attention in plain PyTorch: the specification of the Triton kernel and the CPU path.

For query ``q[b, h, t]`` (kv-head ``hk = h // (Hq // Hkv)``) and its retrieved slots
``j = indices[b, h, t, :]`` (``-1`` = missing):

    key_j   = mem_keys[b, hk, j]                      (rotated at mem_positions[b, j] when tables are given:
                                                       key_j * cos[p] + rotate_half(key_j) * sin[p])
    s_j     = scale * q . key_j                       (-inf where missing)
    lse     = log sum_j exp(s_j)                      (-inf when every slot is missing)
    out     = sum_j exp(s_j - lse) * mem_values[b, hk, j]   (0 when every slot is missing)

Everything is computed in fp32; ``out`` is returned in q's dtype, ``lse`` in fp32. This path gathers
``[B, Hq, T, k, D]`` keys and values (the "torch gather" baseline); the Triton kernel never does.

``merge_attention_naive`` combines two partial softmaxes over disjoint key sets into the joint softmax.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Gathered key (or value) elements per query block of the CPU path (4 MB in fp32).
READ_BLOCK_ELEMENTS = 1 << 20


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF convention: ``[x1, x2] -> [-x2, x1]`` over the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rows(buf: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``buf [B, Hkv, C, E]``, ``slots [B, Hkv, n]`` -> ``[B, Hkv, n, E]``: the rows each kv-head reads.

    Query head ``h = hk * G + g`` reads kv-head ``hk``, so a query's (G, T, k) reads are one axis per
    kv-head and no head is duplicated. A contiguous buffer is read with one row copy per read; dim-major
    keys (``KNNMemory`` on CPU) along their contiguous slot axis, one element per read and dimension
    (decode at 16K slots, 288 reads per layer: 40 -> 29 ms over 30 layers against a gather over the
    strided view, 1 thread, load ~2.5); any other layout element by element.
    """
    B, Hkv, C, E = buf.shape
    if buf.is_contiguous():
        base = torch.arange(B * Hkv, device=slots.device).view(B, Hkv, 1) * C
        return buf.reshape(-1, E).index_select(0, (slots + base).reshape(-1)).view(B, Hkv, -1, E)
    if buf.stride(-2) == 1:
        dim_major = buf.transpose(-1, -2)  # [B, Hkv, E, C]
        return dim_major.gather(3, slots[:, :, None, :].expand(-1, -1, E, -1)).transpose(-1, -2).contiguous()
    return buf.gather(2, slots[..., None].expand(-1, -1, -1, E))


def _rotate(keys: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``keys [B, Hkv, n, D]`` (fp32) rotated at ``positions [B, Hkv|1, n]`` (clamped into the tables)."""
    rows = positions.clamp(0, cos.shape[0] - 1).reshape(-1)
    shape = (*positions.shape, keys.shape[-1])
    c = cos.float().index_select(0, rows).view(shape)
    s = sin.float().index_select(0, rows).view(shape)
    return keys * c + rotate_half(keys) * s


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
    -> (out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32). Inputs are assumed validated.

    A chunk of many queries reads more rows than the buffers hold (``G * T * k >= C``): then every
    slot is converted (and rotated) once, laid out slot-major, and the reads copy finished rows. A
    few queries (decode) read their rows first and rotate only those.
    """
    B, Hq, T, D = q.shape
    Hkv, C = mem_keys.shape[1], mem_keys.shape[2]
    k, Dv = indices.shape[3], mem_values.shape[3]
    rotary = rotary_cos is not None
    keys, values = mem_keys, mem_values
    if Hq * T * k >= Hkv * C:  # the reads outnumber the slots: convert (and rotate) every slot once
        keys = mem_keys.contiguous().float()
        if rotary:
            keys = _rotate(keys, mem_positions[:, None], rotary_cos, rotary_sin)
        values = mem_values.contiguous().float()
        rotary = False
    # Queries a block at a time: each block's gathered rows stay near READ_BLOCK_ELEMENTS (cache-sized,
    # reused heap memory), where one [B, Hq, T, k, D] read of a whole chunk (tens of MB) page-faulted
    # its way through fresh memory. Every query's result is computed alone, so blocks change nothing.
    step = max(1, READ_BLOCK_ELEMENTS // max(1, B * Hq * k * max(D, Dv)))
    parts = [_attend_block(q[:, :, t0:t0 + step], keys, values, indices[:, :, t0:t0 + step], scale, rotary,
                           mem_positions, rotary_cos, rotary_sin) for t0 in range(0, T, step)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([o for o, _ in parts], dim=2), torch.cat([l for _, l in parts], dim=2)


def _attend_block(q, keys, values, indices, scale, rotary, mem_positions, rotary_cos, rotary_sin):
    """``memory_attention_naive`` of the queries ``q [B, Hq, t, D]`` over ``keys/values`` (the raw
    buffers, rotated here when ``rotary``, or already converted and rotated)."""
    B, Hq, T, D = q.shape
    Hkv = keys.shape[1]
    k = indices.shape[3]
    valid = indices >= 0
    slots = indices.clamp_min(0).long().reshape(B, Hkv, -1)  # [B, Hkv, G * t * k]
    mk = _rows(keys, slots).float()
    if rotary:
        mk = _rotate(mk, mem_positions.gather(1, slots.reshape(B, -1)).view(slots.shape), rotary_cos, rotary_sin)
    mv = _rows(values, slots).float()
    rows = B * Hq * T
    # One [1, D] x [D, k] product per query: bmm runs this orientation several times faster than
    # [k, D] x [D, 1] (504 queries x 32 memories x 64 dims: 0.09 ms against 0.6 ms, 1 thread).
    scores = torch.bmm(q.float().reshape(rows, 1, D), mk.view(rows, k, D).transpose(1, 2)).view(B, Hq, T, k)
    scores = torch.where(valid, scores * scale, float("-inf"))
    # A query with no valid memory has m = -inf; shifting by 0 instead keeps exp() finite (all zeros).
    m = torch.nan_to_num(scores.amax(dim=-1), nan=0.0, posinf=0.0, neginf=0.0)
    p = torch.exp(scores - m[..., None])
    l = p.sum(dim=-1)
    tiny = torch.finfo(torch.float32).tiny
    out = torch.bmm(p.view(rows, 1, k), mv.view(rows, k, -1)).view(B, Hq, T, -1) / l.clamp_min(tiny)[..., None]
    # l == 0: no valid memory (lse -inf, with finite gradients); a NaN score (NaN query) leaves NaN in
    # out and lse alike.
    lse = torch.where(l == 0, float("-inf"), m + torch.log(l.clamp_min(tiny)))
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
