"""Triton weighted embedding bag: ``out[t] = sum_j w[t, j] * weight[idx[t, j]]``.

Read top to bottom: kernels, host forward/backward, autograd Function, public function.

Forward: one program per (block of tokens, block of columns) streams the K gathered rows through an
fp32 accumulator, so ``[T, K, D]`` never exists.

Backward for the table (``weight``): the T*K lookups are stably sorted by row; each segment of equal
rows is reduced by one program in a fixed order and written once. No atomics (a hot row is not a
serialization point of thousands of atomic adds), deterministic, and rows that were not hit are never
touched by the kernel. The segment boundaries are found without a host synchronization: the grid is
sized by an upper bound on the number of segments and programs past the actual count exit at once.
An atomic scatter variant is kept for callers that prefer speed over determinism (the DKVB default).

Backward for ``per_sample_weights``: ``grad_w[t, j] = grad_out[t] . weight[idx[t, j]]``, computed only
when the weights require grad.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _lookup(IDX, PSW, rt, mt, j, stride_idx, stride_psw, scale, HAS_PSW: tl.constexpr, BLOCK_T: tl.constexpr):
    """Lookup j of tokens rt: the value row and its weight (``scale`` without per-sample weights)."""
    row = tl.load(IDX + rt.to(tl.int64) * stride_idx + j, mask=mt, other=0).to(tl.int64)
    if HAS_PSW:
        w = tl.load(PSW + rt.to(tl.int64) * stride_psw + j, mask=mt, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK_T,), dtype=tl.float32) + scale
    return row, w


@triton.jit
def embedding_bag_fwd_kernel(
    W, IDX, PSW, OUT, T, K, D, scale,
    stride_w, stride_idx, stride_psw, stride_out,
    HAS_PSW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mt = rt < T
    mask = mt[:, None] & (rd < D)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(0, K):
        row, w = _lookup(IDX, PSW, rt, mt, j, stride_idx, stride_psw, scale, HAS_PSW, BLOCK_T)
        vals = tl.load(W + row[:, None] * stride_w + rd[None, :], mask=mask, other=0.0)
        acc += w[:, None] * vals.to(tl.float32)
    tl.store(OUT + rt.to(tl.int64)[:, None] * stride_out + rd[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def embedding_bag_bwd_weight_kernel(
    GOUT, PSW, PERM, ROWS_SORTED, STARTS, NUM_SEGMENTS, GW, K, D, scale,
    stride_gout, stride_gw,
    HAS_PSW: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = rd < D
    if seg < tl.load(NUM_SEGMENTS):
        start = tl.load(STARTS + seg)
        end = tl.load(STARTS + seg + 1)
        row = tl.load(ROWS_SORTED + start).to(tl.int64)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # Lookups of this row in sorted (stable) order, BLOCK_E at a time: a fixed reduction order.
        for e0 in range(start, end, BLOCK_E):
            re = e0 + tl.arange(0, BLOCK_E)
            me = re < end
            flat = tl.load(PERM + re, mask=me, other=0)  # position in the flattened [T, K] lookups
            tok = flat // K
            if HAS_PSW:
                w = tl.load(PSW + flat, mask=me, other=0.0).to(tl.float32)
            else:
                w = tl.where(me, scale, 0.0)
            g = tl.load(GOUT + tok[:, None] * stride_gout + rd[None, :], mask=me[:, None] & md[None, :], other=0.0)
            acc += tl.sum(w[:, None] * g.to(tl.float32), axis=0)
        tl.store(GW + row * stride_gw + rd, acc.to(GW.dtype.element_ty), mask=md)


@triton.jit
def embedding_bag_bwd_weight_atomic_kernel(
    GOUT, IDX, PSW, GW, T, K, D, scale,
    stride_gout, stride_idx, stride_psw, stride_gw,
    HAS_PSW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mt = rt < T
    mask = mt[:, None] & (rd < D)[None, :]
    g = tl.load(GOUT + rt.to(tl.int64)[:, None] * stride_gout + rd[None, :], mask=mask, other=0.0).to(tl.float32)
    for j in range(0, K):
        row, w = _lookup(IDX, PSW, rt, mt, j, stride_idx, stride_psw, scale, HAS_PSW, BLOCK_T)
        tl.atomic_add(GW + row[:, None] * stride_gw + rd[None, :], w[:, None] * g, mask=mask)


@triton.jit
def embedding_bag_bwd_psw_kernel(
    GOUT, W, IDX, GPSW, T, K, D,
    stride_gout, stride_w, stride_idx, stride_gpsw,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mt = rt < T
    rt64 = rt.to(tl.int64)
    for j in range(0, K):
        row = tl.load(IDX + rt64 * stride_idx + j, mask=mt, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            rd = d0 + tl.arange(0, BLOCK_D)
            mask = mt[:, None] & (rd < D)[None, :]
            g = tl.load(GOUT + rt64[:, None] * stride_gout + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(W + row[:, None] * stride_w + rd[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(g * v, axis=1)
        tl.store(GPSW + rt64 * stride_gpsw + j, acc.to(GPSW.dtype.element_ty), mask=mt)


def _block_d(D: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(D), cap))


def embedding_bag_fwd(
    weight: torch.Tensor, indices: torch.Tensor, per_sample_weights: Optional[torch.Tensor], scale: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """weight [V, D], indices [T, K], per_sample_weights [T, K] or None (every weight = ``scale``) -> [T, D]."""
    assert weight.stride(1) == 1 and indices.stride(1) == 1
    T, K = indices.shape
    D = weight.shape[1]
    out = torch.empty((T, D), device=weight.device, dtype=out_dtype or weight.dtype)
    if T == 0:
        return out
    psw = per_sample_weights if per_sample_weights is not None else indices  # dummy pointer when absent
    BLOCK_T, BLOCK_D = 8, _block_d(D, 512)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    embedding_bag_fwd_kernel[grid](
        weight, indices, psw, out, T, K, D, float(scale),
        weight.stride(0), indices.stride(0), psw.stride(0), out.stride(0),
        HAS_PSW=per_sample_weights is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return out


def sort_lookups(indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the flattened lookups by row, without a host synchronization.

    Returns ``(perm [L], rows_sorted [L], starts [L + 1], num_segments [1])`` with ``L = T * K``:
    ``rows_sorted = flat[perm]`` (stable), segment ``s`` spans ``perm[starts[s]:starts[s + 1]]``.
    """
    flat = indices.reshape(-1)
    L = flat.numel()
    rows_sorted, perm = torch.sort(flat, stable=True)
    is_start = torch.ones(L, dtype=torch.bool, device=flat.device)
    is_start[1:] = rows_sorted[1:] != rows_sorted[:-1]
    seg_id = torch.cumsum(is_start, 0) - 1
    starts = torch.full((L + 1,), L, dtype=torch.int64, device=flat.device)
    starts.scatter_reduce_(0, seg_id, torch.arange(L, device=flat.device), reduce="amin")
    return perm, rows_sorted, starts, seg_id[-1:] + 1


def embedding_bag_weight_grad(
    grad_out: torch.Tensor, indices: torch.Tensor, per_sample_weights: Optional[torch.Tensor], num_rows: int,
    scale: float = 1.0, deterministic: bool = True, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """grad_out [T, D], indices [T, K] -> grad of the table [num_rows, D] (zero in rows never hit)."""
    T, K = indices.shape
    D = grad_out.shape[1]
    grad_out = grad_out.contiguous()
    psw = per_sample_weights.contiguous() if per_sample_weights is not None else None
    if T * K == 0:
        return torch.zeros((num_rows, D), device=grad_out.device, dtype=out_dtype)
    if deterministic:
        gw = torch.zeros((num_rows, D), device=grad_out.device, dtype=out_dtype)
        perm, rows_sorted, starts, num_segments = sort_lookups(indices)
        # There are at most min(lookups, rows) segments; BLOCK_E covers an average segment in one step.
        max_segments = min(T * K, num_rows)
        BLOCK_E = min(32, max(4, triton.next_power_of_2(triton.cdiv(T * K, max_segments))))
        BLOCK_D = _block_d(D, 512)
        grid = (max_segments, triton.cdiv(D, BLOCK_D))
        embedding_bag_bwd_weight_kernel[grid](
            grad_out, psw if psw is not None else perm, perm, rows_sorted, starts, num_segments, gw, K, D,
            float(scale), grad_out.stride(0), gw.stride(0),
            HAS_PSW=psw is not None, BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, num_warps=4,
        )
        return gw
    # Atomics accumulate in fp32 whatever the table's dtype, then cast once.
    gw = torch.zeros((num_rows, D), device=grad_out.device, dtype=torch.float32)
    BLOCK_T, BLOCK_D = 8, _block_d(D, 256)
    grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
    embedding_bag_bwd_weight_atomic_kernel[grid](
        grad_out, indices, psw if psw is not None else indices, gw, T, K, D, float(scale),
        grad_out.stride(0), indices.stride(0), (psw if psw is not None else indices).stride(0), gw.stride(0),
        HAS_PSW=psw is not None, BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return gw.to(out_dtype)


def embedding_bag_psw_grad(grad_out: torch.Tensor, weight: torch.Tensor, indices: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """grad_out [T, D], weight [V, D], indices [T, K] -> grad of per_sample_weights [T, K]."""
    T, K = indices.shape
    D = weight.shape[1]
    grad_out = grad_out.contiguous()
    gpsw = torch.empty((T, K), device=weight.device, dtype=out_dtype)
    if T == 0:
        return gpsw
    BLOCK_T, BLOCK_D = 8, _block_d(D, 256)
    embedding_bag_bwd_psw_kernel[(triton.cdiv(T, BLOCK_T),)](
        grad_out, weight, indices, gpsw, T, K, D,
        grad_out.stride(0), weight.stride(0), indices.stride(0), gpsw.stride(0),
        BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return gpsw


class WeightedEmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, indices, per_sample_weights):
        out = embedding_bag_fwd(weight, indices, per_sample_weights)
        ctx.save_for_backward(weight, indices, per_sample_weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight, indices, psw = ctx.saved_tensors
        grad_weight = grad_psw = None
        if ctx.needs_input_grad[0]:
            grad_weight = embedding_bag_weight_grad(grad_out, indices, psw, weight.shape[0], out_dtype=weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_psw = embedding_bag_psw_grad(grad_out, weight, indices, psw.dtype)
        return grad_weight, None, grad_psw


def weighted_embedding_bag_triton(weight: torch.Tensor, indices: torch.Tensor, per_sample_weights: torch.Tensor) -> torch.Tensor:
    """Triton path of :func:`memlayers.ops.embedding_bag.weighted_embedding_bag` (same shapes; checked there)."""
    return WeightedEmbeddingBagFunction.apply(
        weight if weight.stride(1) == 1 else weight.contiguous(), indices.contiguous(), per_sample_weights.contiguous()
    )
