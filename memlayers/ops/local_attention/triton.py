"""Triton flash attention for the causal local pass, returning the log-sum-exp (forward and backward).

Read top to bottom: device helpers, kernels, host forward/backward, autograd Function, public function.

Keys are ``[prefix of P keys, the T keys of the queries]`` (``S = P + T``); query ``t`` sees key ``j``
when ``j <= t + P``, and the prefix only on rows whose ``prefix_valid`` is True (others start their
key loop at P). Scores ``q k^T`` and ``p v`` are ``tl.dot`` tiles; the softmax is online, in the exp2
domain, so no ``[T, S]`` score matrix ever reaches memory.

Forward: one program owns (batch row, query head, BLOCK_M queries) and walks the key blocks the causal
mask leaves open, keeping a running max ``m``, sum ``l`` and accumulator; ``lse = m + log l``.

Backward recomputes ``p = exp(s - lse)``. With ``delta = rowsum(dO * O) - dlse`` the gradient of both
outputs is ``ds = p * (dO v^T - delta)`` (``d lse / d s = p``, so dlse joins the row term); then
``dq = scale * ds k``, ``dk = scale * ds^T q``, ``dv = p^T dO``. Two kernels, no atomics:
- dk/dv: one program owns (batch row, kv-head, BLOCK_N keys) and sums over the G query heads of its
  group and the query blocks that can see those keys;
- dq: one program owns (batch row, query head, BLOCK_M queries) and walks the keys like the forward.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..utils import interpreter_enabled

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(base, rows, stride_row, n_rows, BLOCK_C: tl.constexpr, n_cols, UPCAST: tl.constexpr):
    """A [len(rows), BLOCK_C] tile of a row-major matrix, zero outside ``n_rows x n_cols``."""
    cols = tl.arange(0, BLOCK_C)
    x = tl.load(base + rows[:, None] * stride_row + cols[None, :],
                mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :], other=0.0)
    if UPCAST:  # the interpreter's bf16 tl.dot is wrong; bf16 -> fp32 is exact
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(base, rows, stride_row, n_rows, BLOCK_C: tl.constexpr, n_cols, x):
    cols = tl.arange(0, BLOCK_C)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], x.to(base.dtype.element_ty),
             mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _first_key(PREFIX_VALID, b, P, MASK_PREFIX: tl.constexpr):
    """The first key a row may see: 0, or P where that row's prefix is hidden."""
    lo = 0
    if MASK_PREFIX:
        lo = tl.where(tl.load(PREFIX_VALID + b) != 0, 0, P)
    return lo


@triton.jit
def _query_program(PREFIX_VALID, Hq, G, T, S, MASK_PREFIX: tl.constexpr, BLOCK_M: tl.constexpr):
    """A query-block program: batch row b, query head h, kv-head h // G, its BLOCK_M query rows, and
    the keys [lo, hi) they may see (the block's last query sees up to its own key P + t)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    lo = _first_key(PREFIX_VALID, b, S - T, MASK_PREFIX)
    return b, h, h // G, m0 + tl.arange(0, BLOCK_M), lo, tl.minimum(S, S - T + m0 + BLOCK_M)


@triton.jit
def _row_stats(LSE, DELTA, row, offs_m, T):
    """Saved lse (in the exp2 domain) and delta of the query rows offs_m of one head."""
    lse2 = tl.load(LSE + row + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
    return lse2, tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)


@triton.jit
def _visible(offs_m, offs_n, P, lo):
    """[BLOCK_M, BLOCK_N]: key j is open to query t. Padding queries (t >= T) see keys too, but their
    q and dO load as zeros, so they add nothing to any gradient and are never stored."""
    return (offs_n[None, :] <= offs_m[:, None] + P) & (offs_n[None, :] >= lo)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse2, delta, visible, scale_log2, PREC: tl.constexpr):
    """Recomputed probabilities p and score gradients ds = p * (dO v^T - delta), both [BLOCK_M, BLOCK_N]."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
    p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    return p, p * (dp - delta[:, None])


@triton.jit
def local_attention_fwd_kernel(
    Q, K, V, PREFIX_VALID, OUT, LSE,
    Hq, G, T, S, D, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_ot,
    scale_log2,
    MASK_PREFIX: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, offs_m, lo, hi = _query_program(PREFIX_VALID, Hq, G, T, S, MASK_PREFIX, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, T, BLOCK_D, D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # Key `lo` is open to every row, and it lies in the first block: after that block every m_i is
    # finite, so exp2(m_i - m_new) never meets -inf - (-inf).
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, stride_ks, S, BLOCK_D, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2
        s = tl.where(_visible(offs_m, offs_n, S - T, lo), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, stride_vs, S, BLOCK_DV, DV, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    _store_rows(OUT + b * stride_ob + h * stride_oh, offs_m, stride_ot, T, BLOCK_DV, DV, acc / l_i[:, None])
    tl.store(LSE + (b * Hq + h) * T + offs_m, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=offs_m < T)


@triton.jit
def local_attention_bwd_dkv_kernel(
    Q, K, V, PREFIX_VALID, DO, LSE, DELTA, DK, DV_,
    Hkv, G, T, S, D, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    scale, scale_log2,
    MASK_PREFIX: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    P = S - T
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, stride_ks, S, BLOCK_D, D, UPCAST)
    v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, stride_vs, S, BLOCK_DV, DV, UPCAST)

    # Query t sees key j from t = j - P on: start at the block's first open key; a block made only of
    # a hidden prefix has no query at all (its gradients stay 0).
    lo = _first_key(PREFIX_VALID, b, P, MASK_PREFIX)
    first = tl.maximum(n0, lo)
    t_lo = tl.where(first < n0 + BLOCK_N, tl.maximum(first - P, 0), T)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        for m0 in range(t_lo, T, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, T, BLOCK_D, D, UPCAST)
            do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, T, BLOCK_DV, DV, UPCAST)
            lse2, delta = _row_stats(LSE, DELTA, (b * Hkv * G + h) * T, offs_m, T)
            p, ds = _probs_and_dscores(q, k, v, do, lse2, delta, _visible(offs_m, offs_n, P, lo), scale_log2, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)

    _store_rows(DK + b * stride_dkb + hk * stride_dkh, offs_n, stride_dks, S, BLOCK_D, D, dk * scale)
    _store_rows(DV_ + b * stride_dvb + hk * stride_dvh, offs_n, stride_dvs, S, BLOCK_DV, DV, dv)


@triton.jit
def local_attention_bwd_dq_kernel(
    Q, K, V, PREFIX_VALID, DO, LSE, DELTA, DQ,
    Hq, G, T, S, D, DV,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    scale, scale_log2,
    MASK_PREFIX: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, offs_m, lo, hi = _query_program(PREFIX_VALID, Hq, G, T, S, MASK_PREFIX, BLOCK_M)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, T, BLOCK_D, D, UPCAST)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, T, BLOCK_DV, DV, UPCAST)
    lse2, delta = _row_stats(LSE, DELTA, (b * Hq + h) * T, offs_m, T)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(K + b * stride_kb + hk * stride_kh, offs_n, stride_ks, S, BLOCK_D, D, UPCAST)
        v = _load_rows(V + b * stride_vb + hk * stride_vh, offs_n, stride_vs, S, BLOCK_DV, DV, UPCAST)
        _, ds = _probs_and_dscores(q, k, v, do, lse2, delta, _visible(offs_m, offs_n, S - T, lo), scale_log2, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

    _store_rows(DQ + b * stride_dqb + h * stride_dqh, offs_m, stride_dqt, T, BLOCK_D, D, dq * scale)


# ----------------------------------------------------------------------------------------------- host

class _Launch:
    """Tile sizes and the arguments every kernel shares, for one (q, k, v, prefix_valid) call."""

    def __init__(self, q, k, v, prefix_valid, backward: bool):
        B, Hq, T, D = q.shape
        self.B, self.Hq, self.Hkv, self.T, self.S = B, Hq, k.shape[1], T, k.shape[2]
        self.D, self.Dv = D, v.shape[3]
        block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs every dim >= 16
        block_dv = max(16, triton.next_power_of_2(self.Dv))
        interpret = interpreter_enabled()
        upcast = interpret and q.dtype == torch.bfloat16
        block_m, block_n, self.num_warps, self.num_stages = _tiles(T, k.shape[2], block_d, block_dv, q.element_size(),
                                                                    backward, interpret)
        # int32 rows; a dummy pointer when every prefix is visible (MASK_PREFIX is a constexpr).
        self.prefix_valid = q if prefix_valid is None else prefix_valid.to(torch.int32)
        prec = _dot_precision(q.dtype, interpret)
        self.meta = dict(MASK_PREFIX=prefix_valid is not None, PREC=prec, UPCAST=upcast,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv)

    def launch(self, kernel, grid, *args):
        kernel[grid](*args, **self.meta, num_warps=self.num_warps, num_stages=self.num_stages)

    def query_grid(self):
        return (triton.cdiv(self.T, self.meta["BLOCK_M"]), self.B * self.Hq)

    def key_grid(self):
        return (triton.cdiv(self.S, self.meta["BLOCK_N"]), self.B * self.Hkv)


def _tiles(T: int, S: int, block_d: int, block_dv: int, elem_size: int, backward: bool, interpret: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). On a GPU: untuned choices that keep the pipelined
    key/value tiles well inside an H100's shared memory."""
    if interpret:
        # The interpreter runs each tl.dot as a numpy matmul: at most 2^18 multiply-adds keeps OpenBLAS
        # single-threaded (larger ones were measured 1000x slower on a busy 2-core machine).
        widest = max(block_d, block_dv)
        block_m = max(16, min(64, triton.next_power_of_2(T), (1 << 12) // widest))
        block_n = max(16, min(128, triton.next_power_of_2(S), (1 << 18) // (block_m * widest)))
        return block_m, block_n, 4, 1
    if elem_size == 4:
        # fp32 operands take twice the registers of 16-bit ones, and tf32x3 splits each in two: the
        # 16-bit tiles spilled ~27 KB per thread at head dim 64 (ptxas, sm_90), 4 warps still 8-36
        # bytes, and the dk/dv program still 8-12 bytes with a second pipeline stage. Wider heads
        # shrink the row blocks in proportion (the head-dim-64 tiles spilled 0.1-18 KB at 128/256;
        # these spill nothing at 128, and 0.1-0.3 KB in the head-dim-256 backward).
        wide = max(block_d, block_dv) // 64
        if backward:
            return max(16, 32 // wide), max(16, 32 // wide), 8, 1
        return max(16, 64 // wide), max(16, 32 // wide), 8, 2 if wide <= 1 else 1
    narrow = block_d + block_dv <= 256  # one k row plus one v row of 16-bit elements fit 512 bytes: D <= 128
    if backward:  # the dk/dv program also keeps two fp32 [BLOCK_N, D] accumulators
        if block_d <= 64:
            return 64, 64, 4, 2
        # head dim 128: 32 queries a step, or the dk/dv program spilled 8-72 bytes (ptxas, 8 warps)
        # head dim 256: 8 warps, one stage (4 warps, two stages spilled 16-80 bytes)
        return (32, 64, 8, 2) if narrow else (32, 32, 8, 1)
    return (128, 64, 4 if block_d <= 64 else 8, 3) if narrow else (64, 32, 4, 2)


def _dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """fp32 inputs: split-precision tensor-core dots (three tf32 products, ~fp32 accuracy) instead of
    full-precision FMA dots, whose operands live in registers and spill. The interpreter (numpy
    matmul) computes every precision as plain fp32, so there "ieee" and "tf32x3" give the same result."""
    if interpret:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"  # 16-bit operands: the flag does not apply


def _strides(*tensors: torch.Tensor):
    """Strides of the batch, head and row dimensions of each tensor, in order (last dim contiguous)."""
    return [s for x in tensors for s in x.stride()[:3]]


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def local_attention_fwd(q, k, v, scale, prefix_valid=None, out=None, lse=None):
    """Launch the forward kernel: -> (out [B, Hq, T, Dv] q.dtype, lse [B, Hq, T] fp32).

    ``out``/``lse`` may be given as buffers of those shapes (lse contiguous; tests pass NaN-filled ones)."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    run = _Launch(q, k, v, prefix_valid, backward=False)
    if out is None:
        out = torch.empty(run.B, run.Hq, run.T, run.Dv, device=q.device, dtype=q.dtype)
    if lse is None:
        lse = torch.empty(run.B, run.Hq, run.T, device=q.device, dtype=torch.float32)
    run.launch(local_attention_fwd_kernel, run.query_grid(),
               q, k, v, run.prefix_valid, out, lse,
               run.Hq, run.Hq // run.Hkv, run.T, run.S, run.D, run.Dv,
               *_strides(q, k, v, out), scale * LOG2E)
    return out, lse


def local_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, scale, prefix_valid=None, dq=None, dk=None, dv=None):
    """Launch the backward kernels: -> (dq like q, dk like k, dv like v).

    ``grad_lse`` may be None (no gradient reached lse); ``dq``/``dk``/``dv`` may be given as buffers."""
    q, k, v, grad_out = (_last_dim_contiguous(x) for x in (q, k, v, grad_out))
    run = _Launch(q, k, v, prefix_valid, backward=True)
    # delta folds the lse gradient in: ds = p * (dO.v - rowsum(dO * O) + dlse).
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta, lse = delta.contiguous(), lse.contiguous()
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    shared = (q, k, v, run.prefix_valid, grad_out, lse, delta)
    run.launch(local_attention_bwd_dkv_kernel, run.key_grid(), *shared, dk, dv,
               run.Hkv, run.Hq // run.Hkv, run.T, run.S, run.D, run.Dv,
               *_strides(q, k, v, grad_out, dk, dv), scale, scale * LOG2E)
    run.launch(local_attention_bwd_dq_kernel, run.query_grid(), *shared, dq,
               run.Hq, run.Hq // run.Hkv, run.T, run.S, run.D, run.Dv,
               *_strides(q, k, v, grad_out, dq), scale, scale * LOG2E)
    return dq, dk, dv


class LocalAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, prefix_valid):
        out, lse = local_attention_fwd(q, k, v, scale, prefix_valid)
        ctx.save_for_backward(q, k, v, prefix_valid, out, lse)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        # autograd materializes a missing gradient as zeros: both are tensors here.
        q, k, v, prefix_valid, out, lse = ctx.saved_tensors
        dq, dk, dv = local_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, ctx.scale, prefix_valid)
        return dq, dk, dv, None, None


def local_attention_triton(q, k, v, scale: float, prefix_valid=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flash local attention with log-sum-exp (inputs assumed validated by ``local_attention``, T >= 1).

    Args:
        q: ``[B, Hq, T, D]``; k: ``[B, Hkv, S, D]``; v: ``[B, Hkv, S, Dv]``, ``S = P + T``;
        scale: the score scale; prefix_valid: ``[B]`` bool or None (every prefix visible).

    Returns:
        ``(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32)``, differentiable through both.

    Example:
        >>> import torch
        >>> from memlayers.ops.local_attention.triton import local_attention_triton
        >>> q = torch.randn(1, 8, 100, 64, device="cuda", dtype=torch.bfloat16)
        >>> kv = torch.randn(1, 2, 150, 64, device="cuda", dtype=torch.bfloat16)
        >>> out, lse = local_attention_triton(q, kv, kv, 0.125)
    """
    return LocalAttentionFunction.apply(q, k, v, scale, prefix_valid)
