"""Fused exact top-k search in Triton.

Stage 1 (the kernel): a program owns BLOCK_R query rows of one (batch row, kv-head) and a contiguous
split of the M keys. It scores one [BLOCK_R, BLOCK_M] tile at a time with ``tl.dot`` and folds the tile
into a running top-k buffer kept in registers, so the T x M score matrix never reaches memory.

Each (score, slot) pair is packed into one int64 whose order is the score's order: the fp32 bits are
mapped to an order-preserving int32 in the high word, the slot id sits in the low word. One integer
max/min then yields score and slot together, and packed values are unique (ties broken by slot).

The buffer holds k packed values (padded to a power of two). Folding a tile repeats "the tile's best
replaces the buffer's worst" while any row's tile best beats its buffer worst: after the first tiles
few entries qualify, so most tiles cost one max and one min per row and no sorting network.

Stage 2 (host): the per-split candidates [.., S, k] are merged and sorted by ``torch.topk``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..utils.dispatch import interpreter_enabled
from .naive import knn_search_naive

METRIC_CODES = {"ip": 0, "cosine": 1, "l2": 2}
# The largest k the kernel keeps in registers: a program's buffer is BLOCK_R (16 at this k) x k int64,
# 32 values per thread at 4 warps. Larger k (where sorting, not scoring, is the cost) runs the chunked
# torch path (cuBLAS scores + two-stage torch.topk), so the buffer never spills whatever k is asked.
MAX_KERNEL_K = 256
NORM_EPS = 1e-12
_I64_MIN = tl.constexpr(-(2**63))
_I64_MAX = tl.constexpr(2**63 - 1)
_I32_MIN = tl.constexpr(-(2**31))


@triton.jit
def _pack(scores, slots):
    """fp32 scores + int32 slots -> int64 keys ordered like the scores."""
    bits = scores.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | slots.to(tl.int64)


@triton.jit
def knn_search_fwd_kernel(
    Q, K, LENGTHS, OUT_SCORES, OUT_INDICES,
    stride_qb, stride_qh, stride_qr, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_or, stride_os,
    num_kv_heads, R, D, TOPK, tiles_per_split,
    METRIC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // num_kv_heads
    h = pid_bh % num_kv_heads

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    dim_ok = dims < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qr + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qf = q.to(tl.float32)
    q_sq = tl.sum(qf * qf, axis=1)
    q_inv_norm = 1.0 / tl.maximum(tl.sqrt(q_sq), 1e-12)

    length = tl.load(LENGTHS + b * stride_lb + h * stride_lh)
    m_lo = pid_s * tiles_per_split * BLOCK_M
    m_hi = tl.minimum(m_lo + tiles_per_split * BLOCK_M, length)

    # Distinct sentinels below any real key, so "replace the minimum" always hits exactly one slot;
    # padding columns past TOPK hold the int64 maximum and are never replaced.
    cols_k = tl.arange(0, KP)
    lowest = tl.full((BLOCK_R, KP), _I64_MIN, tl.int64)
    buf = tl.where(cols_k[None, :] < TOPK, lowest + cols_k.to(tl.int64)[None, :],
                   tl.full((BLOCK_R, KP), _I64_MAX, tl.int64))
    empty = tl.full((BLOCK_R, BLOCK_M), _I64_MIN, tl.int64)

    k_base = K + b * stride_kb + h * stride_kh
    for m0 in range(m_lo, m_hi, BLOCK_M):
        slots = m0 + tl.arange(0, BLOCK_M)
        slot_ok = slots < m_hi
        kt = tl.load(k_base + slots[:, None] * stride_km + dims[None, :] * stride_kd,
                     mask=slot_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC)
        if METRIC == 1:
            kf = kt.to(tl.float32)
            k_inv_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), 1e-12)
            s = s * q_inv_norm[:, None] * k_inv_norm[None, :]
        elif METRIC == 2:
            kf = kt.to(tl.float32)
            s = 2.0 * s - q_sq[:, None] - tl.sum(kf * kf, axis=1)[None, :]
        # NaN scores would pack above every number: they become -inf (no match; the host marks them -1).
        s = tl.where(s == s, s, float("-inf"))
        tile = tl.where(slot_ok[None, :], _pack(s, slots), empty)

        tile_best = tl.max(tile, axis=1)
        buf_worst = tl.min(buf, axis=1)
        while tl.max((tile_best > buf_worst).to(tl.int32), axis=0) > 0:
            better = tile_best > buf_worst
            buf = tl.where(better[:, None] & (buf == buf_worst[:, None]), tile_best[:, None], buf)
            tile = tl.where(better[:, None] & (tile == tile_best[:, None]), empty, tile)
            tile_best = tl.max(tile, axis=1)
            buf_worst = tl.min(buf, axis=1)

    # Unpack; sentinels (high word INT32_MIN) become (-inf, -1).
    high = (buf >> 32).to(tl.int32)
    is_real = high != _I32_MIN
    bits = high ^ ((high >> 31) & 0x7FFFFFFF)
    scores = tl.where(is_real, bits.to(tl.float32, bitcast=True), float("-inf"))
    # int64 -> int32 keeps the low word: the slot (< 2**31, so non-negative).
    slots_out = tl.where(is_real, buf.to(tl.int32).to(tl.int64), -1)
    out_off = b * stride_ob + h * stride_oh + rows[:, None] * stride_or + pid_s * stride_os + cols_k[None, :]
    out_mask = row_ok[:, None] & (cols_k[None, :] < TOPK)
    tl.store(OUT_SCORES + out_off, scores, mask=out_mask)
    tl.store(OUT_INDICES + out_off, slots_out, mask=out_mask)


def _block_sizes(R: int, M: int, D: int, kp: int, elem_size: int) -> Tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    # Keep the register buffer near 4K packed values per program.
    block_r = max(16, min(64, 4096 // kp))
    block_m = 64 if block_d <= 128 else 32
    if elem_size == 4:
        # fp32 tiles take twice the registers of 16-bit ones (and tf32x3 splits each operand in two):
        # at the 16-bit tiles they spilled 2-9 KB per thread (ptxas, sm_90/sm_80, head dim 64).
        block_r, block_m = max(16, block_r // 2), 32
    block_r = min(block_r, max(16, triton.next_power_of_2(R)))
    block_m = min(block_m, max(16, triton.next_power_of_2(M)))
    return block_r, block_m, block_d


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: split-precision tensor-core dots (three tf32 products, ~fp32 accuracy) instead of
    full-precision FMA dots, whose register-held operands spill. The interpreter (numpy matmul)
    computes every precision as plain fp32, so there "ieee" and "tf32x3" give the same scores."""
    if interpreter_enabled():
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"  # 16-bit operands: the flag does not apply


def _num_splits(n_tiles: int, base_programs: int, device: torch.device) -> int:
    """Split the keys so the grid fills the GPU even for a handful of queries (decode)."""
    if device.type != "cuda" or interpreter_enabled():
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(target, max(1, base_programs))))


def knn_search_fwd(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    lengths: torch.Tensor,
    metric: str,
    splits: Optional[int] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: per-split candidates (into ``out`` when given, e.g. poisoned buffers in tests).

    queries [B, Hkv, R, D] (R = group x T), keys [B, Hkv, M, D], lengths [B, Hkv] int64
    -> (scores [B, Hkv, R, S, k] fp32, slots [B, Hkv, R, S, k] int64), unsorted within a split.
    """
    B, Hkv, R, D = queries.shape
    M = keys.shape[2]
    if k > MAX_KERNEL_K:
        raise ValueError(f"k must be at most {MAX_KERNEL_K} in the kernel, got {k}")
    kp = triton.next_power_of_2(k)
    block_r, block_m, block_d = _block_sizes(R, M, D, kp, queries.element_size())
    n_tiles = max(1, triton.cdiv(M, block_m))
    base = B * Hkv * triton.cdiv(R, block_r)
    S = splits if splits is not None else _num_splits(n_tiles, base, queries.device)
    S = max(1, min(S, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, S)
    S = triton.cdiv(n_tiles, tiles_per_split)

    if out is None:
        out = (torch.empty(B, Hkv, R, S, k, device=queries.device, dtype=torch.float32),
               torch.empty(B, Hkv, R, S, k, device=queries.device, dtype=torch.int64))
    out_scores, out_slots = out
    if out_scores.shape != (B, Hkv, R, S, k) or out_slots.shape != (B, Hkv, R, S, k):
        raise ValueError(f"out buffers must have shape {(B, Hkv, R, S, k)}")
    # The triton 3.9 interpreter computes tl.dot wrongly for bf16 operands; bf16 -> fp32 is exact,
    # so there the tiles are upcast and multiplied in fp32 (GPUs use the native bf16 dot).
    upcast = queries.dtype == torch.bfloat16 and interpreter_enabled()
    grid = (triton.cdiv(R, block_r), B * Hkv, S)
    knn_search_fwd_kernel[grid](
        queries, keys, lengths, out_scores, out_slots,
        *queries.stride(), *keys.stride(), *lengths.stride(),
        *out_scores.stride()[:4],
        Hkv, R, D, k, tiles_per_split,
        METRIC=METRIC_CODES[metric],
        BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_D=block_d, KP=kp,
        PREC=_dot_precision(queries.dtype),
        UPCAST=upcast,
        # Head dim >= 128: 8 warps share the tiles (4 spilled 16-24 bytes at bf16 d128, triton 3.9 sm_80).
        num_warps=4 if block_d <= 64 else 8,
    )
    return out_scores, out_slots


def knn_search_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    valid_lengths: Optional[torch.Tensor] = None,
    metric: str = "ip",
    splits: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [B, Hq, T, D], keys [B, Hkv, M, D] -> (scores [B, Hq, T, k] fp32, indices [B, Hq, T, k] int64).

    Same contract as ``memlayers.knn_search`` (which validates the arguments and calls this for the
    Triton backend). Search is not differentiable: scores are returned detached.
    """
    B, Hq, T, D = queries.shape
    Hkv, M = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    q = queries.detach().reshape(B, Hkv, group * T, D)
    kd = keys.detach()
    if valid_lengths is None:
        lengths = torch.full((B, Hkv), M, device=keys.device, dtype=torch.int64)
    else:
        lengths = valid_lengths.to(device=keys.device, dtype=torch.int64)
        lengths = lengths[:, None].expand(B, Hkv) if lengths.dim() == 1 else lengths
        lengths = lengths.clamp(0, M).contiguous()
    if M == 0 or T == 0:
        return (queries.new_full((B, Hq, T, k), float("-inf"), dtype=torch.float32),
                torch.full((B, Hq, T, k), -1, device=queries.device, dtype=torch.int64))

    if k > MAX_KERNEL_K:
        return knn_search_naive(queries.detach(), kd, k, valid_lengths, metric)
    cand_scores, cand_slots = knn_search_fwd(q, kd, k, lengths, metric, splits=splits)
    R = group * T
    cand_scores = cand_scores.reshape(B, Hkv, R, -1)
    cand_slots = cand_slots.reshape(B, Hkv, R, -1)
    scores, order = torch.topk(cand_scores, k, dim=-1, sorted=True)
    slots = cand_slots.gather(-1, order).masked_fill(scores == float("-inf"), -1)
    return scores.reshape(B, Hq, T, k), slots.reshape(B, Hq, T, k)
