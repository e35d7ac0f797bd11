"""Triton DKVB lookup: per codebook, distance + top-k + value fetch + mean in one pass.

Read top to bottom: kernel, host forward/backward, autograd Function, public function.

One program owns (codebook c, block of BLOCK_B inputs). It streams the codebook's keys in BLOCK_N
tiles: distances ``||k||^2 - 2 q.k`` come from one ``tl.dot`` per tile with fp32 accumulation, at
about fp32 accuracy so that the choice of nearest key agrees with the fp32 reference: 16-bit operands
as they are (their products are exact in fp32), fp32 ones as split-precision tf32x3 products (~2e-7
relative error; full-precision "ieee" dots keep their operands in registers and spilled). A running
top-k set of ``k`` (distance, index) pairs per row is updated by ``k`` rounds of min-extraction from
the tile, each replacing the set's worst entry when better. The interpreter runs these rounds fast, unlike tl.sort/tl.topk, and k is
small in the DKVB. Neither the ``[C, B, N]`` distances nor a one-hot ever exist. Finally the set is
emitted nearest first and the chosen value rows are gathered and averaged in fp32.

Backward: only ``values`` has a gradient, ``grad_out[b, c] / k`` added into the fetched rows;
this is the embedding-bag table gradient over the flattened ``[C * N, Dv]`` values, either by fp32
atomics (default) or by the sorted segment reduction (``deterministic=True``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..embedding_bag.triton import embedding_bag_weight_grad
from ..utils.dispatch import interpreter_enabled


@triton.jit
def dkvb_fwd_kernel(
    Q, KEYS, VALS, MASK, OUT, IDX, B, N, DK, DV,
    stride_qb, stride_qc, stride_kc, stride_kn, stride_vc, stride_vn, stride_mc,
    stride_ob, stride_oc, stride_ib, stride_ic,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    rb = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mb = rb < B
    rb64 = rb.to(tl.int64)
    rdk = tl.arange(0, BLOCK_DK)
    q = tl.load(Q + rb64[:, None] * stride_qb + c * stride_qc + rdk[None, :], mask=mb[:, None] & (rdk < DK)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    slot = tl.arange(0, K_PAD)
    # Padding slots hold -inf so that they are never the "worst" entry and never get replaced.
    best_d = tl.where(slot[None, :] < TOPK, float("inf"), float("-inf")) + tl.zeros((BLOCK_B, K_PAD), dtype=tl.float32)
    best_i = tl.zeros((BLOCK_B, K_PAD), dtype=tl.int64)
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + cols
        mn = rn < N
        k = tl.load(KEYS + c * stride_kc + rn.to(tl.int64)[:, None] * stride_kn + rdk[None, :],
                    mask=mn[:, None] & (rdk < DK)[None, :], other=0.0)
        kf = k.to(tl.float32)
        k_sq = tl.sum(kf * kf, axis=1)
        if UPCAST:
            k = kf
        dist = k_sq[None, :] - 2.0 * tl.dot(q, tl.trans(k), input_precision=PREC)
        ok = mn
        if HAS_MASK:
            ok = ok & (tl.load(MASK + c * stride_mc + rn, mask=mn, other=0) != 0)
        # NaN counts as +inf, which never replaces the set's initial +inf: such a key is no match.
        dist = tl.where(ok[None, :] & (dist == dist), dist, float("inf"))
        for _ in tl.static_range(TOPK):
            cand = tl.min(dist, axis=1)
            cand_col = tl.argmin(dist, axis=1)
            worst = tl.max(best_d, axis=1)
            worst_slot = tl.argmax(best_d, axis=1)
            # Strict '<': on equal distance the earlier (lower) key index is kept.
            replace = (slot[None, :] == worst_slot[:, None]) & (cand < worst)[:, None]
            best_d = tl.where(replace, cand[:, None], best_d)
            best_i = tl.where(replace, (n0 + cand_col).to(tl.int64)[:, None], best_i)
            dist = tl.where(cols[None, :] == cand_col[:, None], float("inf"), dist)

    # Emit nearest first; padding slots become +inf so that the min-extraction skips them.
    best_d = tl.where(slot[None, :] < TOPK, best_d, float("inf"))
    rdv = tl.arange(0, BLOCK_DV)
    mv = mb[:, None] & (rdv < DV)[None, :]
    acc = tl.zeros((BLOCK_B, BLOCK_DV), dtype=tl.float32)
    found = rb >= 0
    for j in tl.static_range(TOPK):
        nearest_slot = tl.argmin(best_d, axis=1)
        hit = tl.min(best_d, axis=1) < float("inf")  # +inf: no match was found for this pick
        pick = slot[None, :] == nearest_slot[:, None]
        row = tl.sum(tl.where(pick, best_i, 0), axis=1)
        best_d = tl.where(pick, float("inf"), best_d)  # taken: never picked again while matches remain
        found = found & hit
        tl.store(IDX + rb64 * stride_ib + c * stride_ic + j, tl.where(hit, row, -1), mask=mb)
        v = tl.load(VALS + c * stride_vc + row[:, None] * stride_vn + rdv[None, :], mask=mv & hit[:, None], other=0.0)
        acc += v.to(tl.float32)
    acc = tl.where(found[:, None], acc / TOPK, float("nan"))
    tl.store(OUT + rb64[:, None] * stride_ob + c * stride_oc + rdv[None, :], acc.to(OUT.dtype.element_ty), mask=mv)


def dkvb_fwd(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, key_mask: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [B, C, Dk], keys [C, N, Dk], values [C, N, Dv] -> (out [B, C, Dv], indices [B, C, k])."""
    B, C, Dk = queries.shape
    N, Dv = keys.shape[1], values.shape[2]
    queries = queries if queries.stride(2) == 1 else queries.contiguous()
    keys = keys if keys.stride(2) == 1 else keys.contiguous()
    values = values if values.stride(2) == 1 else values.contiguous()
    out = torch.empty((B, C, Dv), device=values.device, dtype=values.dtype)
    indices = torch.empty((B, C, k), device=values.device, dtype=torch.int64)
    if B == 0 or C == 0:
        return out, indices
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else keys  # dummy pointer when absent
    BLOCK_B = 32
    block_dk = max(16, triton.next_power_of_2(Dk))
    # Key tiles of at most 4K elements: wider ones spilled (head dim 256, ptxas sm_90/sm_80).
    BLOCK_N = max(16, min(64, 4096 // block_dk))
    interpret = interpreter_enabled()
    # The interpreter's tl.dot is wrong for bf16 operands (triton 3.9) and ignores the precision flag:
    # there every operand is fp32 and the dot plain fp32.
    upcast = interpret and queries.dtype != torch.float32
    prec = "ieee" if interpret else ("tf32x3" if queries.dtype == torch.float32 else "tf32")
    grid = (C, triton.cdiv(B, BLOCK_B))
    dkvb_fwd_kernel[grid](
        queries, keys, values, mask, out, indices, B, N, Dk, Dv,
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        mask.stride(0), out.stride(0), out.stride(1), indices.stride(0), indices.stride(1),
        TOPK=k, K_PAD=max(2, triton.next_power_of_2(k)), HAS_MASK=key_mask is not None, PREC=prec, UPCAST=upcast,
        BLOCK_B=BLOCK_B, BLOCK_N=BLOCK_N, BLOCK_DK=block_dk,
        BLOCK_DV=triton.next_power_of_2(Dv), num_warps=4,
    )
    return out, indices


def dkvb_bwd(grad_out: torch.Tensor, indices: torch.Tensor, values_shape, values_dtype, deterministic: bool) -> torch.Tensor:
    """grad_out [B, C, Dv], indices [B, C, k] -> grad of values [C, N, Dv] (zero in rows never fetched)."""
    B, C, k = indices.shape
    _, N, Dv = values_shape
    # A row with a missing pick (-1) has a NaN output and passes no gradient (as in the naive path).
    grad_out = grad_out.masked_fill((indices < 0).any(dim=-1, keepdim=True), 0)
    # Row c * N + n of the flattened [C * N, Dv] values; one bag per (b, c) with weights 1 / k.
    flat_rows = (indices.clamp_min(0) + torch.arange(C, device=indices.device)[None, :, None] * N).reshape(B * C, k)
    grad = embedding_bag_weight_grad(
        grad_out.reshape(B * C, Dv), flat_rows, None, C * N, scale=1.0 / k,
        deterministic=deterministic, out_dtype=values_dtype,
    )
    return grad.reshape(C, N, Dv)


class DKVBLookupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries, keys, values, k, key_mask, deterministic):
        out, indices = dkvb_fwd(queries, keys, values, k, key_mask)
        ctx.save_for_backward(indices)
        ctx.values_shape, ctx.values_dtype, ctx.deterministic = tuple(values.shape), values.dtype, deterministic
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad_out, _grad_indices):
        (indices,) = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = dkvb_bwd(grad_out, indices, ctx.values_shape, ctx.values_dtype, ctx.deterministic)
        return None, None, grad_values, None, None, None


def dkvb_lookup_triton(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int = 1,
    key_mask: Optional[torch.Tensor] = None, deterministic: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton path of :func:`memlayers.ops.dkvb.dkvb_lookup` (same shapes; checked there)."""
    return DKVBLookupFunction.apply(queries, keys, values, k, key_mask, deterministic)
