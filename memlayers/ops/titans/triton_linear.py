"""Triton kernels of the linear Titans memory (one matrix ``W [Dk, Dv]`` per batch row and head).

One program per (batch, head) walks the chunks in order, keeping ``W`` and the momentum ``S`` in
fp32 registers. A chunk is matmuls (see naive.py for the formulas):

    E = g(K W - V)                                   # per-token gradients are k_j^T e_j
    Y = A * (Q W) + d * (Q S) - ((Q K^T) * c * theta) E
    W' = A_last W + d_last S - K^T (c[last] * theta * E)
    S' = B_last S - K^T ((B_last / B_j) * theta * E)

The forward stores the state every ``R`` chunks (``R ~ sqrt(#chunks)``). The backward walks the
segments in reverse: it recomputes the segment's chunk-start states into a scratch buffer of ``R``
states, then back-propagates through its chunks last to first, carrying dW and dS.
"""
import triton
import triton.language as tl

from .triton_common import (
    _load_chunk_bwd_rows, _load_rows, _load_state, _store_chunk_grads, _store_rows, _store_state,
    bias_grad, bias_hess, chunk_gates, gates_bwd, pick, pick_row,
)


@triton.jit
def _linear_chunk_fwd(
    Q, K, V, TH, AL, ET, Y, W, S, tbase, t0, T, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, PREC: tl.constexpr, WRITE_Y: tl.constexpr,
):
    th, la, lb, LA, LB, c, d, A, Bv, is_last = chunk_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    k = _load_rows(K, tbase, t0, T, DK, BK, BC)
    v = _load_rows(V, tbase, t0, T, DV, BV, BC)
    e = bias_grad(tl.dot(k, W, input_precision=PREC) - v, BIAS, p, delta, eps)
    if WRITE_Y:
        q = _load_rows(Q, tbase, t0, T, DK, BK, BC)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        y = A[:, None] * tl.dot(q, W, input_precision=PREC) - tl.dot(qk * c * th[None, :], e, input_precision=PREC)
        if MOMENTUM:
            y += d[:, None] * tl.dot(q, S, input_precision=PREC)
        _store_rows(Y, y, tbase, t0, T, DV, BV, BC)
    w_end = pick_row(c, is_last) * th
    Wn = pick(A, is_last) * W - tl.dot(tl.trans(k), w_end[:, None] * e, input_precision=PREC)
    if MOMENTUM:
        Wn += pick(d, is_last) * S
        lb_last = pick(lb, is_last)
        s_end = tl.exp(lb_last - lb) * th
        S = tl.exp(lb_last) * S - tl.dot(tl.trans(k), s_end[:, None] * e, input_precision=PREC)
    return Wn, S


@triton.jit
def titans_linear_fwd_kernel(
    Q, K, V, TH, AL, ET, W0, S0, Y, WT, ST, CKW, CKS,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    W, S = _load_state(W0, S0, bh, MOMENTUM, DK, DV, BK, BV)
    for ci in range(0, NC):
        if ci % R == 0:
            _store_state(CKW, CKS, bh * nseg + ci // R, W, S, MOMENTUM, DK, DV, BK, BV)
        W, S = _linear_chunk_fwd(
            Q, K, V, TH, AL, ET, Y, W, S, bh * T, ci * BC, T, p, delta, eps,
            DK, DV, BK, BV, BC, MOMENTUM, FORGET, BIAS, PREC, True,
        )
    _store_state(WT, ST, bh, W, S, MOMENTUM, DK, DV, BK, BV)


@triton.jit
def _linear_chunk_bwd(
    Q, K, V, TH, AL, ET, DY, DQ, DK_, DV_, DTH, DAL, DET,
    W, S, dW, dS, tbase, t0, T, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, PREC: tl.constexpr,
):
    """Gradients of one chunk given its start state (W, S) and the gradients (dW, dS) of its end state.

    Stores dq, dk, dv and the gate gradients of the chunk; returns the gradients of (W, S).
    """
    th, la, lb, LA, LB, c, d, A, Bv, is_last = chunk_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    q, k, v, dy = _load_chunk_bwd_rows(Q, K, V, DY, tbase, t0, T, DK, DV, BK, BV, BC)
    r = tl.dot(k, W, input_precision=PREC) - v
    e = bias_grad(r, BIAS, p, delta, eps)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)
    ct = c * th[None, :]
    w_end = pick_row(c, is_last) * th
    # Retrieval Y = A (Q W) + d (Q S) - (QK^T * ct) E.
    dP = tl.dot(dy, tl.trans(e), input_precision=PREC)
    dct = -(qk * dP)
    de = -tl.dot(tl.trans(qk * ct), dy, input_precision=PREC)
    dq = A[:, None] * tl.dot(dy, tl.trans(W), input_precision=PREC) - tl.dot(dP * ct, k, input_precision=PREC)
    dk = -tl.dot(tl.trans(dP * ct), q, input_precision=PREC)
    dA = tl.sum(tl.dot(q, W, input_precision=PREC) * dy, 1)
    dW0 = tl.dot(tl.trans(q), A[:, None] * dy, input_precision=PREC) + pick(A, is_last) * dW
    # End state W' = A_last W + d_last S - K^T (w_end * E).
    kdW = tl.dot(k, dW, input_precision=PREC)
    de -= w_end[:, None] * kdW
    dk -= w_end[:, None] * tl.dot(e, tl.trans(dW), input_precision=PREC)
    dw_end = -tl.sum(kdW * e, 1)
    dA += tl.where(is_last, tl.sum(tl.sum(W * dW, 1), 0), 0.0)
    if MOMENTUM:
        dq += d[:, None] * tl.dot(dy, tl.trans(S), input_precision=PREC)
        dd = tl.sum(tl.dot(q, S, input_precision=PREC) * dy, 1)
        dd += tl.where(is_last, tl.sum(tl.sum(S * dW, 1), 0), 0.0)
        lb_last = pick(lb, is_last)
        s_end = tl.exp(lb_last - lb) * th
        kdS = tl.dot(k, dS, input_precision=PREC)
        de -= s_end[:, None] * kdS
        dk -= s_end[:, None] * tl.dot(e, tl.trans(dS), input_precision=PREC)
        ds_end = -tl.sum(kdS * e, 1)
        db_end = tl.sum(tl.sum(S * dS, 1), 0)
        dS0 = (
            tl.dot(tl.trans(q), d[:, None] * dy, input_precision=PREC)
            + pick(d, is_last) * dW
            + tl.exp(lb_last) * dS
        )
    else:
        dd = tl.zeros([BC], dtype=tl.float32)
        ds_end = tl.zeros([BC], dtype=tl.float32)
        db_end = 0.0
        dS0 = dS
    # Per-token gradients E = g(K W - V).
    dr = de * bias_hess(r, BIAS, p, delta, eps)
    dk += tl.dot(dr, tl.trans(W), input_precision=PREC)
    dW0 += tl.dot(tl.trans(k), dr, input_precision=PREC)
    _store_chunk_grads(DQ, DK_, DV_, dq, dk, -dr, tbase, t0, T, DK, DV, BK, BV, BC)
    gates_bwd(
        dct, dw_end, ds_end, dA, dd, db_end, th, la, lb, LA, LB, c, Bv, is_last,
        AL, ET, DTH, DAL, DET, tbase, t0, T, BC, MOMENTUM, FORGET,
    )
    return dW0, dS0


@triton.jit
def titans_linear_bwd_kernel(
    Q, K, V, TH, AL, ET, CKW, CKS, SCW, SCS, DY, DWT, DST,
    DQ, DK_, DV_, DTH, DAL, DET, DW0, DS0,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    dW, dS = _load_state(DWT, DST, bh, MOMENTUM, DK, DV, BK, BV)
    for si in range(0, nseg):
        seg = nseg - 1 - si
        n_in = tl.minimum(R, NC - seg * R)
        # Recompute the segment's chunk-start states from its checkpoint.
        W, S = _load_state(CKW, CKS, bh * nseg + seg, MOMENTUM, DK, DV, BK, BV)
        for r in range(0, n_in):
            _store_state(SCW, SCS, bh * R + r, W, S, MOMENTUM, BK, BV, BK, BV)
            if r < n_in - 1:
                W, S = _linear_chunk_fwd(
                    Q, K, V, TH, AL, ET, Q, W, S, bh * T, (seg * R + r) * BC, T, p, delta, eps,
                    DK, DV, BK, BV, BC, MOMENTUM, FORGET, BIAS, PREC, False,
                )
        tl.debug_barrier()
        for rr in range(0, n_in):
            r = n_in - 1 - rr
            W, S = _load_state(SCW, SCS, bh * R + r, MOMENTUM, BK, BV, BK, BV)
            dW, dS = _linear_chunk_bwd(
                Q, K, V, TH, AL, ET, DY, DQ, DK_, DV_, DTH, DAL, DET,
                W, S, dW, dS, bh * T, (seg * R + r) * BC, T, p, delta, eps,
                DK, DV, BK, BV, BC, MOMENTUM, FORGET, BIAS, PREC,
            )
        tl.debug_barrier()
    _store_state(DW0, DS0, bh, dW, dS, MOMENTUM, DK, DV, BK, BV)
