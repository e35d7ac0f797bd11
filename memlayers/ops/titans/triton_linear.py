"""Triton kernels of the linear Titans memory (one matrix ``W [Dk, Dv]`` per batch row and head).

The memory is split over value columns: the grid is ``(batch * head, Dv / BV)`` and each program
owns the ``[Dk, BV]`` column block of ``W`` and of the momentum ``S``, in fp32 registers, as
production delta-rule kernels keep their state. The split is exact because every per-token
quantity is columnwise: the bias gradient ``E = g(K W - V)`` is elementwise, so its column block
needs only ``W``'s column block, and so do the retrieval and the state update. A chunk is matmuls
(see naive.py for the formulas), recomputing the small ``[C, C]`` gate and ``Q K^T`` matrices per
column block:

    E = g(K W - V)                                   # per-token gradients are k_j^T e_j
    Y = A * (Q W) + d * (Q S) - ((Q K^T) * c * theta) E
    W' = A_last W + d_last S - K^T (c[last] * theta * E)
    S' = B_last S - K^T ((B_last / B_j) * theta * E)

The forward stores the state every ``R`` chunks (``R ~ sqrt(#chunks)``). The backward walks the
segments in reverse: it recomputes the segment's chunk-start states into a scratch buffer of ``R``
states, then back-propagates through its chunks last to first, carrying dW and dS. The gradients
that sum over value columns are accumulated across column blocks: ``dq`` and ``dk`` with fp32
atomic adds (per-block copies would take Dv / BV times their memory), the gates' (linear in their
inputs, ``[T]`` per block) as per-block partials the host sums; ``dv`` and the state gradients
are columnwise and written in place.
"""
import triton
import triton.language as tl

from .triton_common import (
    _add_rows, _load_rows, _load_rows_raw, _load_state, _store_rows, _store_state, bias_grad, bias_hess, chunk_gates, gates_bwd,
    mm, pick, pick_row,
)


@triton.jit
def _linear_chunk_fwd(
    Q, K, V, TH, AL, ET, Y, W, S, tbase, t0, T, v0, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
    WRITE_Y: tl.constexpr,
):
    """One chunk for the column block ``v0 .. v0+BV``: stores its retrieval (with ``WRITE_Y``), returns the end state."""
    th, la, lb, LA, LB, c, d, A, Bv, is_last = chunk_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    k = _load_rows_raw(K, tbase, t0, T, 0, DK, BK, BC)
    v = _load_rows(V, tbase, t0, T, v0, DV, BV, BC)
    e = bias_grad(mm(k, W, MM, PREC) - v, BIAS, p, delta, eps)
    if WRITE_Y:
        q = _load_rows_raw(Q, tbase, t0, T, 0, DK, BK, BC)
        qk = mm(q, tl.trans(k), MM, PREC)
        y = A[:, None] * mm(q, W, MM, PREC) - mm(qk * c * th[None, :], e, MM, PREC)
        if MOMENTUM:
            y += d[:, None] * mm(q, S, MM, PREC)
        _store_rows(Y, y, tbase, t0, T, v0, DV, BV, BC)
    w_end = pick_row(c, is_last) * th
    Wn = pick(A, is_last) * W - mm(tl.trans(k), w_end[:, None] * e, MM, PREC)
    if MOMENTUM:
        Wn += pick(d, is_last) * S
        lb_last = pick(lb, is_last)
        s_end = tl.exp(lb_last - lb) * th
        S = tl.exp(lb_last) * S - mm(tl.trans(k), s_end[:, None] * e, MM, PREC)
    return Wn, S


@triton.jit
def titans_linear_fwd_kernel(
    Q, K, V, TH, AL, ET, W0, S0, Y, WT, ST, CKW, CKS,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    nseg = tl.cdiv(NC, R)
    W, S = _load_state(W0, S0, bh, 0, v0, MOMENTUM, DK, DV, BK, BV)
    for ci in range(0, NC):
        if ci % R == 0:
            _store_state(CKW, CKS, bh * nseg + ci // R, 0, v0, W, S, MOMENTUM, DK, DV, BK, BV)
        W, S = _linear_chunk_fwd(
            Q, K, V, TH, AL, ET, Y, W, S, bh * T, ci * BC, T, v0, p, delta, eps,
            DK, DV, BK, BV, BC, MOMENTUM, FORGET, BIAS, MM, PREC, True,
        )
    _store_state(WT, ST, bh, 0, v0, W, S, MOMENTUM, DK, DV, BK, BV)


@triton.jit
def _linear_chunk_bwd(
    Q, K, V, TH, AL, ET, DY, DQP, DKP, DV_, DTH, DAL, DET,
    W, S, dW, dS, tbase, pbase, t0, T, v0, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """Gradients of one chunk's column block given its start state (W, S) and the gradients (dW, dS)
    of its end state.

    Stores dv's block, adds this block's share of dq, dk (``SPLIT``: several value blocks, fp32
    atomics; else plain stores), stores its partial gate gradients (rows ``pbase + t``); returns
    the gradients of (W, S).
    """
    th, la, lb, LA, LB, c, d, A, Bv, is_last = chunk_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    q = _load_rows_raw(Q, tbase, t0, T, 0, DK, BK, BC)
    k = _load_rows_raw(K, tbase, t0, T, 0, DK, BK, BC)
    v = _load_rows(V, tbase, t0, T, v0, DV, BV, BC)
    dy = _load_rows(DY, tbase, t0, T, v0, DV, BV, BC)
    r = mm(k, W, MM, PREC) - v
    e = bias_grad(r, BIAS, p, delta, eps)
    qk = mm(q, tl.trans(k), MM, PREC)
    ct = c * th[None, :]
    w_end = pick_row(c, is_last) * th
    # Retrieval Y = A (Q W) + d (Q S) - (QK^T * ct) E.
    dP = mm(dy, tl.trans(e), MM, PREC)
    dct = -(qk * dP)
    de = -mm(tl.trans(qk * ct), dy, MM, PREC)
    dq = A[:, None] * mm(dy, tl.trans(W), MM, PREC) - mm(dP * ct, k, MM, PREC)
    dk = -mm(tl.trans(dP * ct), q, MM, PREC)
    dA = tl.sum(mm(q, W, MM, PREC) * dy, 1)
    dW0 = mm(tl.trans(q), A[:, None] * dy, MM, PREC) + pick(A, is_last) * dW
    # End state W' = A_last W + d_last S - K^T (w_end * E).
    kdW = mm(k, dW, MM, PREC)
    de -= w_end[:, None] * kdW
    dk -= w_end[:, None] * mm(e, tl.trans(dW), MM, PREC)
    dw_end = -tl.sum(kdW * e, 1)
    dA += tl.where(is_last, tl.sum(tl.sum(W * dW, 1), 0), 0.0)
    if MOMENTUM:
        dq += d[:, None] * mm(dy, tl.trans(S), MM, PREC)
        dd = tl.sum(mm(q, S, MM, PREC) * dy, 1)
        dd += tl.where(is_last, tl.sum(tl.sum(S * dW, 1), 0), 0.0)
        lb_last = pick(lb, is_last)
        s_end = tl.exp(lb_last - lb) * th
        kdS = mm(k, dS, MM, PREC)
        de -= s_end[:, None] * kdS
        dk -= s_end[:, None] * mm(e, tl.trans(dS), MM, PREC)
        ds_end = -tl.sum(kdS * e, 1)
        db_end = tl.sum(tl.sum(S * dS, 1), 0)
        dS0 = mm(tl.trans(q), d[:, None] * dy, MM, PREC) + pick(d, is_last) * dW + tl.exp(lb_last) * dS
    else:
        dd = tl.zeros([BC], dtype=tl.float32)
        ds_end = tl.zeros([BC], dtype=tl.float32)
        db_end = 0.0
        dS0 = dS
    # Per-token gradients E = g(K W - V).
    dr = de * bias_hess(r, BIAS, p, delta, eps)
    dk += mm(dr, tl.trans(W), MM, PREC)
    dW0 += mm(tl.trans(k), dr, MM, PREC)
    if SPLIT:
        _add_rows(DQP, dq, tbase, t0, T, 0, DK, BK, BC)
        _add_rows(DKP, dk, tbase, t0, T, 0, DK, BK, BC)
    else:
        _store_rows(DQP, dq, tbase, t0, T, 0, DK, BK, BC)
        _store_rows(DKP, dk, tbase, t0, T, 0, DK, BK, BC)
    _store_rows(DV_, -dr, tbase, t0, T, v0, DV, BV, BC)
    gates_bwd(
        dct, dw_end, ds_end, dA, dd, db_end, th, la, lb, LA, LB, c, Bv, is_last,
        AL, ET, DTH, DAL, DET, tbase, pbase, t0, T, BC, MOMENTUM, FORGET,
    )
    return dW0, dS0


@triton.jit
def titans_linear_bwd_kernel(
    Q, K, V, TH, AL, ET, CKW, CKS, SCW, SCS, DY, DWT, DST,
    DQP, DKP, DV_, DTH, DAL, DET, DW0, DS0,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    v0 = vb * BV
    nbh = tl.num_programs(0)
    nseg = tl.cdiv(NC, R)
    # This program's rows in the partial buffers [Dv / BV, B * H * T, ...] and its scratch states.
    pbase = (vb * nbh + bh) * T
    sc0 = (vb * nbh + bh) * R
    dW, dS = _load_state(DWT, DST, bh, 0, v0, MOMENTUM, DK, DV, BK, BV)
    for si in range(0, nseg):
        seg = nseg - 1 - si
        n_in = tl.minimum(R, NC - seg * R)
        # Recompute the segment's chunk-start states from its checkpoint.
        W, S = _load_state(CKW, CKS, bh * nseg + seg, 0, v0, MOMENTUM, DK, DV, BK, BV)
        for r in range(0, n_in):
            _store_state(SCW, SCS, sc0 + r, 0, 0, W, S, MOMENTUM, BK, BV, BK, BV)
            if r < n_in - 1:
                W, S = _linear_chunk_fwd(
                    Q, K, V, TH, AL, ET, Q, W, S, bh * T, (seg * R + r) * BC, T, v0, p, delta, eps,
                    DK, DV, BK, BV, BC, MOMENTUM, FORGET, BIAS, MM, PREC, False,
                )
        tl.debug_barrier()
        for rr in range(0, n_in):
            r = n_in - 1 - rr
            W, S = _load_state(SCW, SCS, sc0 + r, 0, 0, MOMENTUM, BK, BV, BK, BV)
            dW, dS = _linear_chunk_bwd(
                Q, K, V, TH, AL, ET, DY, DQP, DKP, DV_, DTH, DAL, DET,
                W, S, dW, dS, bh * T, pbase, (seg * R + r) * BC, T, v0, p, delta, eps,
                DK, DV, BK, BV, BC, MOMENTUM, FORGET, BIAS, MM, PREC, tl.num_programs(1) > 1,
            )
        tl.debug_barrier()
    _store_state(DW0, DS0, bh, 0, v0, dW, dS, MOMENTUM, DK, DV, BK, BV)
