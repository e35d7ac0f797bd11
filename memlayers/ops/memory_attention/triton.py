"""Triton retrieval attention: each query attends over its own k memory slots, gathered by index.

Read top to bottom: device helpers (the in-kernel gather and rotate-on-read), kernels, host launch and
forward/backward, autograd Function, public function.

One program owns (batch row b, query head h, BLOCK_T queries). It walks the k retrieved slots in
BLOCK_K chunks; for each chunk it loads the slot ids, gathers the ``[BLOCK_T, BLOCK_K, D]`` key rows
straight from the memory buffer of kv-head ``h // G`` (rotating them at their stored positions when
rotary tables are given), scores them against the queries and folds them into an online softmax
(exp2 domain) together with the gathered value rows. No ``[B, H, T, k, D]`` tensor ever exists: the
gathered rows live in registers only. Scores are reductions of elementwise products, not ``tl.dot``:
every query has different keys, so there is no shared tile to multiply, and the work is bound by the
bytes of the gathered rows anyway.

Backward recomputes the probabilities from the saved log-sum-exp, ``p = exp(s - lse)``, and with
``delta = rowsum(dO * O) - dlse`` (the lse gradient folds into the softmax's row term):
``ds = p * (dO . v - delta)``, ``dq = scale * sum_j ds_j k_j``. Memory gradients, when asked for, are
scattered by fp32 atomics into ``[B, Hkv, C, *]`` buffers: ``dv_j += p_j dO`` and
``dk_j += scale * ds_j q`` (un-rotated: ``g * cos + R^T(g * sin)``, where ``R^T`` sends element d to
its rotate_half partner with the sign rotate_half gives it).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..utils import interpreter_enabled

LOG2E = 1.4426950408889634


@triton.jit
def _program_queries(Hq, G, T, BLOCK_T: tl.constexpr):
    """This program's batch row b, query head h, kv-head h // G, its BLOCK_T query rows and their mask."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    return b, h, h // G, offs_t, offs_t < T


@triton.jit
def _lanes(BLOCK: tl.constexpr, n):
    """Offsets 0..BLOCK-1 along a head dimension and the mask of the n real ones."""
    offs = tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _load_query_rows(base, offs_t, stride_t, tmask, cols, colmask):
    """[BLOCK_T, len(cols)] fp32 rows of one head (q or dO), zero outside the masks."""
    return tl.load(base + offs_t[:, None] * stride_t + cols[None, :], mask=tmask[:, None] & colmask[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _rotate_half_map(offs_d, D):
    """rotate_half(k)[d] = sign[d] * k[partner[d]]: -k[d + D/2] for d < D/2, k[d - D/2] above."""
    half = D // 2
    return tl.where(offs_d < half, offs_d + half, offs_d - half), tl.where(offs_d < half, -1.0, 1.0)


@triton.jit
def _slot_chunk(IDXb, k0, KNUM, tmask, BLOCK_K: tl.constexpr):
    """Slot ids of the retrieved chunk [k0, k0 + BLOCK_K) of every query: (valid, safe), each
    [BLOCK_T, BLOCK_K]; safe is 0 where the slot is missing, so that gathers stay in bounds."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    idx = tl.load(IDXb + offs_k[None, :], mask=tmask[:, None] & (offs_k < KNUM)[None, :], other=-1).to(tl.int64)
    valid = idx >= 0
    return valid, tl.where(valid, idx, 0)


@triton.jit
def _gather_rows(base, safe, stride_row, cols, mask):
    """Rows ``base[safe]`` of a memory buffer: [BLOCK_T, BLOCK_K, len(cols)] fp32."""
    return tl.load(base + safe[:, :, None] * stride_row + cols[None, None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gather_keys(Kb, POSb, COS, SIN, safe, valid, kmask, offs_d, partner, sign, stride_kc, stride_cp,
                 ROTARY: tl.constexpr):
    """Gathered key rows [BLOCK_T, BLOCK_K, BLOCK_D] fp32, rotated on read when ROTARY
    (``k * cos + rotate_half(k) * sin`` at each slot's stored position), and the (cos, sin) used:
    1 and 0 without rotary. The backward needs them to un-rotate the key gradients."""
    k = _gather_rows(Kb, safe, stride_kc, offs_d, kmask)
    c = 1.0
    s = 0.0
    if ROTARY:
        pos = tl.load(POSb + safe, mask=valid, other=0).to(tl.int64)
        trow = pos[:, :, None] * stride_cp + offs_d[None, None, :]
        c = tl.load(COS + trow, mask=kmask, other=0.0).to(tl.float32)
        s = tl.load(SIN + trow, mask=kmask, other=0.0).to(tl.float32)
        k = k * c + sign[None, None, :] * _gather_rows(Kb, safe, stride_kc, partner, kmask) * s
    return k, c, s


@triton.jit
def memory_attention_fwd_kernel(
    Q, K, V, IDX, POS, COS, SIN,
    Hq, G, T, KNUM, D, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_ib, stride_ih, stride_it,
    stride_pb, stride_cp,
    OUT, LSE,
    stride_ob, stride_oh, stride_ot,
    scale_log2,
    ROTARY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, offs_t, tmask = _program_queries(Hq, G, T, BLOCK_T)
    offs_d, dmask = _lanes(BLOCK_D, D)
    offs_dv, dvmask = _lanes(BLOCK_DV, DV)
    partner, sign = _rotate_half_map(offs_d, D)
    q = _load_query_rows(Q + b * stride_qb + h * stride_qh, offs_t, stride_qt, tmask, offs_d, dmask)
    Kb = K + b * stride_kb + hk * stride_kh
    Vb = V + b * stride_vb + hk * stride_vh
    POSb = POS + b * stride_pb
    IDXb = IDX + b * stride_ib + h * stride_ih + offs_t[:, None] * stride_it

    m_i = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_DV], dtype=tl.float32)
    for k0 in range(0, KNUM, BLOCK_K):
        valid, safe = _slot_chunk(IDXb, k0, KNUM, tmask, BLOCK_K)
        kmask = valid[:, :, None] & dmask[None, None, :]
        k, _, _ = _gather_keys(Kb, POSb, COS, SIN, safe, valid, kmask, offs_d, partner, sign, stride_kc, stride_cp,
                               ROTARY)
        scores = tl.sum(q[:, None, :] * k, axis=2) * scale_log2
        scores = tl.where(valid, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows that have seen no valid slot yet keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _gather_rows(Vb, safe, stride_vc, offs_dv, valid[:, :, None] & dvmask[None, None, :])
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
        m_i = m_new

    # l == 0: no valid slot (out 0, lse -inf). A NaN score (NaN query) makes l NaN: NaN out and lse, as in naive.py.
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_dv[None, :],
             out.to(OUT.dtype.element_ty), mask=tmask[:, None] & dvmask[None, :])
    tl.store(LSE + (b * Hq + h) * T + offs_t, lse, mask=tmask)


@triton.jit
def memory_attention_bwd_kernel(
    Q, K, V, IDX, POS, COS, SIN,
    Hq, G, T, KNUM, D, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_ib, stride_ih, stride_it,
    stride_pb, stride_cp,
    DO, LSE, DELTA, DQ, DK, DV_,
    stride_dob, stride_doh, stride_dot,
    stride_gkb, stride_gkh, stride_gkc,
    stride_gvb, stride_gvh, stride_gvc,
    stride_dqb, stride_dqh, stride_dqt,
    scale, scale_log2,
    ROTARY: tl.constexpr, MEM_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, offs_t, tmask = _program_queries(Hq, G, T, BLOCK_T)
    offs_d, dmask = _lanes(BLOCK_D, D)
    offs_dv, dvmask = _lanes(BLOCK_DV, DV)
    partner, sign = _rotate_half_map(offs_d, D)
    q = _load_query_rows(Q + b * stride_qb + h * stride_qh, offs_t, stride_qt, tmask, offs_d, dmask)
    do = _load_query_rows(DO + b * stride_dob + h * stride_doh, offs_t, stride_dot, tmask, offs_dv, dvmask)
    row = (b * Hq + h) * T + offs_t
    lse = tl.load(LSE + row, mask=tmask, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)  # empty rows: every p is masked
    delta = tl.load(DELTA + row, mask=tmask, other=0.0)
    Kb = K + b * stride_kb + hk * stride_kh
    Vb = V + b * stride_vb + hk * stride_vh
    POSb = POS + b * stride_pb
    IDXb = IDX + b * stride_ib + h * stride_ih + offs_t[:, None] * stride_it
    DKb = DK + b * stride_gkb + hk * stride_gkh
    DVb = DV_ + b * stride_gvb + hk * stride_gvh

    dq = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k0 in range(0, KNUM, BLOCK_K):
        valid, safe = _slot_chunk(IDXb, k0, KNUM, tmask, BLOCK_K)
        kmask = valid[:, :, None] & dmask[None, None, :]
        k, c, s = _gather_keys(Kb, POSb, COS, SIN, safe, valid, kmask, offs_d, partner, sign, stride_kc, stride_cp,
                               ROTARY)
        scores = tl.sum(q[:, None, :] * k, axis=2) * scale_log2
        p = tl.where(valid, tl.exp2(scores - lse2[:, None]), 0.0)
        vmask = valid[:, :, None] & dvmask[None, None, :]
        v = _gather_rows(Vb, safe, stride_vc, offs_dv, vmask)
        dp = tl.sum(do[:, None, :] * v, axis=2)
        ds = p * (dp - delta[:, None])
        dq += tl.sum(ds[:, :, None] * k, axis=1)
        if MEM_GRAD:
            tl.atomic_add(DVb + safe[:, :, None] * stride_gvc + offs_dv[None, None, :],
                          p[:, :, None] * do[:, None, :], mask=vmask)
            # Un-rotate the key gradient g: g * cos, plus R^T(g * sin) scattered to the partners.
            gk = (ds * scale)[:, :, None] * q[:, None, :]
            grow = DKb + safe[:, :, None] * stride_gkc
            tl.atomic_add(grow + offs_d[None, None, :], gk * c, mask=kmask)
            if ROTARY:
                tl.atomic_add(grow + partner[None, None, :], sign[None, None, :] * gk * s, mask=kmask)

    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_t[:, None] * stride_dqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=tmask[:, None] & dmask[None, :])


# ----------------------------------------------------------------------------------------------- host

def _num_warps(block_d: int, block_dv: int) -> int:
    # Wide rows: more threads share the gathered tile, so that it stays in registers.
    return 8 if max(block_d, block_dv) >= 128 else 4


def _blocks(T: int, k: int, D: int, Dv: int, elem_size: int, backward: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_K, BLOCK_D, BLOCK_DV). The gathered [BLOCK_T, BLOCK_K, BLOCK_D] tile of a program
    sits in registers (as fp32, with a 64-bit address per element). On a GPU it holds 8K elements for
    a 16-bit forward and 4K for fp32; the backward, which also holds the value rows, the scatter
    addresses and (rotary) the cos/sin rows, 2K (16-bit) or 1K (fp32) in chunks of at most 16 slots.
    At twice these, kernels spilled 8-800 bytes per thread (ptxas, triton 3.6/3.9, sm_90/sm_80). The
    interpreter is faster with fewer, larger programs."""
    block_d = triton.next_power_of_2(D)
    block_dv = triton.next_power_of_2(Dv)
    if interpreter_enabled():
        budget, max_block_k = 1 << 17, 32
    elif backward:
        budget, max_block_k = (1 << 10) if elem_size == 4 else (1 << 11), 16
    else:
        budget, max_block_k = (1 << 12) if elem_size == 4 else (1 << 13), 32
    # Wide rows take fewer slots a step, so that even one query's tile stays within the budget.
    block_k = min(triton.next_power_of_2(k), max_block_k, max(1, budget // max(block_d, block_dv)))
    block_t = max(1, min(triton.next_power_of_2(T), budget // (block_k * max(block_d, block_dv))))
    return block_t, block_k, block_d, block_dv


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _strides(*tensors: torch.Tensor):
    """Strides of the first three dimensions of each tensor, in order."""
    return [st for x in tensors for st in x.stride()[:3]]


def _launch(kernel, q, mem_keys, mem_values, indices, mem_positions, cos, sin, *pass_args, **constexprs):
    """Launch one pass over every (query block, batch row, query head). Both kernels take the same
    leading arguments (inputs, sizes, strides, rotary tables), then their own ``pass_args``."""
    q, mem_keys, mem_values, indices = (_last_dim_contiguous(x) for x in (q, mem_keys, mem_values, indices))
    B, Hq, T, D = q.shape
    Hkv, Dv, k = mem_keys.shape[1], mem_values.shape[3], indices.shape[3]
    rotary = cos is not None
    if not rotary:  # dummy pointers, never read (ROTARY is a constexpr)
        pos, cos, sin, stride_pb, stride_cp = q, q, q, 0, 0
    else:
        pos, cos, sin = mem_positions.contiguous(), cos.contiguous(), sin.contiguous()
        stride_pb, stride_cp = pos.stride(0), cos.stride(0)
    block_t, block_k, block_d, block_dv = _blocks(T, k, D, Dv, q.element_size(),
                                                  backward=kernel is memory_attention_bwd_kernel)
    kernel[(triton.cdiv(T, block_t), B * Hq)](
        q, mem_keys, mem_values, indices, pos, cos, sin,
        Hq, Hq // Hkv, T, k, D, Dv,
        *_strides(q, mem_keys, mem_values, indices), stride_pb, stride_cp,
        *pass_args,
        ROTARY=rotary, **constexprs,
        BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_DV=block_dv,
        num_warps=_num_warps(block_d, block_dv),
    )


def memory_attention_fwd(q, mem_keys, mem_values, indices, scale, mem_positions=None, cos=None, sin=None,
                         out=None, lse=None):
    """Launch the forward kernel: -> (out [B, Hq, T, Dv] q.dtype, lse [B, Hq, T] fp32).

    ``out``/``lse`` may be given as buffers of those shapes (lse contiguous; tests pass NaN-filled ones)."""
    B, Hq, T, _ = q.shape
    if out is None:
        out = torch.empty(B, Hq, T, mem_values.shape[3], device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    _launch(memory_attention_fwd_kernel, q, mem_keys, mem_values, indices, mem_positions, cos, sin,
            out, lse, *_strides(out), scale * LOG2E)
    return out, lse


def memory_attention_bwd(grad_out, grad_lse, q, mem_keys, mem_values, indices, out, lse, scale,
                         mem_positions=None, cos=None, sin=None, mem_grad=False, dq=None):
    """Launch the backward kernel: -> (dq like q, dk [B, Hkv, C, D] fp32 or None, dv [B, Hkv, C, Dv] fp32 or None).

    ``dq`` may be given as a buffer shaped like q."""
    grad_out = _last_dim_contiguous(grad_out)
    B, Hq, T, D = q.shape
    Hkv, C, Dv = mem_keys.shape[1], mem_keys.shape[2], mem_values.shape[3]
    # delta folds the lse gradient in: ds = p * (dO.v - rowsum(dO * O) + dlse).
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - torch.nan_to_num(grad_lse.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if dq is None:
        dq = torch.empty(B, Hq, T, D, device=q.device, dtype=q.dtype)
    if mem_grad:
        dk = torch.zeros(B, Hkv, C, D, device=q.device, dtype=torch.float32)
        dv = torch.zeros(B, Hkv, C, Dv, device=q.device, dtype=torch.float32)
    else:
        dk = dv = q  # dummy pointers, never written (MEM_GRAD is a constexpr)
    _launch(memory_attention_bwd_kernel, q, mem_keys, mem_values, indices, mem_positions, cos, sin,
            grad_out, lse.contiguous(), delta.contiguous(), dq, dk, dv, *_strides(grad_out, dk, dv, dq),
            scale, scale * LOG2E, MEM_GRAD=mem_grad)
    return dq, (dk if mem_grad else None), (dv if mem_grad else None)


class MemoryAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, mem_keys, mem_values, indices, scale, mem_positions, cos, sin):
        out, lse = memory_attention_fwd(q, mem_keys, mem_values, indices, scale, mem_positions, cos, sin)
        ctx.save_for_backward(q, mem_keys, mem_values, indices, mem_positions, cos, sin, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, mem_keys, mem_values, indices, mem_positions, cos, sin, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        mem_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = memory_attention_bwd(grad_out, grad_lse, q, mem_keys, mem_values, indices, out, lse,
                                          ctx.scale, mem_positions, cos, sin, mem_grad)
        dk = dk.to(mem_keys.dtype) if ctx.needs_input_grad[1] else None
        dv = dv.to(mem_values.dtype) if ctx.needs_input_grad[2] else None
        return dq, dk, dv, None, None, None, None, None


def memory_attention_triton(q, mem_keys, mem_values, indices, scale: float, mem_positions=None, rotary_cos=None,
                            rotary_sin=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton path of ``memory_attention`` (same shapes and meaning; validated there, scale resolved).

    Args:
        q: ``[B, Hq, T, D]``; mem_keys ``[B, Hkv, C, D]``; mem_values ``[B, Hkv, C, Dv]``;
        indices: ``[B, Hq, T, k]`` slot ids, -1 = missing; scale: the score scale;
        mem_positions ``[B, C]`` with rotary_cos/rotary_sin ``[P, D]``: rotate keys on read.

    Returns:
        ``(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32)``.

    Example:
        >>> import torch
        >>> from memlayers.ops.memory_attention.triton import memory_attention_triton
        >>> q = torch.randn(1, 4, 8, 64, device="cuda")
        >>> kv = torch.randn(1, 2, 256, 64, device="cuda")
        >>> out, lse = memory_attention_triton(q, kv, kv, torch.randint(0, 256, (1, 4, 8, 32), device="cuda"), 0.125)
    """
    return MemoryAttentionFunction.apply(q, mem_keys, mem_values, indices, scale, mem_positions, rotary_cos, rotary_sin)
