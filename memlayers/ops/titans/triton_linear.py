"""Triton kernels of the linear Titans memory (one matrix ``W [Dk, Dv]`` per batch row and head).

The memory is split over value columns: the grid is ``(batch * head, Dv / BV)`` and each program
owns the ``[Dk, BV]`` column block of ``W`` and of the momentum ``S``, in fp32 registers, as
production delta-rule kernels keep their state. The split is exact because every per-token
quantity is columnwise: the bias gradient ``E = g(K W - V)`` is elementwise, so its column block
needs only ``W``'s column block, and so do the retrieval and the state update. A chunk is matmuls
(see naive.py for the formulas), with the gate quantities ``c * theta``, ``A``, ``d``, ``w_end``,
``s_end``, ``B`` loaded from what ``triton_gates.py`` computed, and ``Q K^T`` recomputed per column
block:

    E = g(K W - V)                                   # per-token gradients are k_j^T e_j
    Y = A * (Q W) + d * (Q S) - ((Q K^T) * c * theta) E
    W' = A_last W + d_last S - K^T (c[last] * theta * E)
    S' = B_last S - K^T ((B_last / B_j) * theta * E)

The forward stores the state every ``R`` chunks (``R ~ sqrt(#chunks)``). The backward walks the
segments in reverse: it recomputes the segment's chunk-start states into a scratch buffer of ``R``
states, then back-propagates through its chunks last to first, carrying dW and dS. The gradients
that sum over value columns are accumulated across column blocks with fp32 atomic adds (per-block
copies would take Dv / BV times their memory): ``dq``, ``dk`` and the gradients of the gate
quantities, which ``titans_gates_bwd_kernel`` turns into those of theta, alpha and eta; ``dv`` and
the state gradients are columnwise and written in place.
"""
import triton
import triton.language as tl

from .triton_common import (
    _add_rows, _is_last, _load_cc, _load_last, _load_rows, _load_rows_raw, _load_state, _load_vec, _store_cc,
    _store_rows, _store_state, _store_vec, bias_grad, bias_hess, mm,
)


@triton.jit
def _linear_chunk_fwd(
    Q, K, V, CT, GA, GD, GW, GS, GB, Y, W, S, tbase, cidx, t0, T, v0, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, WRITE_Y: tl.constexpr,
):
    """Chunk ``cidx`` (tokens from ``t0``) for the column block ``v0 .. v0+BV``: stores its retrieval
    (with ``WRITE_Y``), returns the end state."""
    k = _load_rows_raw(K, tbase, t0, T, 0, DK, BK, BC)
    v = _load_rows(V, tbase, t0, T, v0, DV, BV, BC)
    e = bias_grad(mm(k, W, MM, PREC) - v, BIAS, p, delta, eps)
    if WRITE_Y:
        q = _load_rows_raw(Q, tbase, t0, T, 0, DK, BK, BC)
        qk = mm(q, tl.trans(k), MM, PREC) * _load_cc(CT, cidx, BC)
        y = _load_vec(GA, tbase, t0, T, BC)[:, None] * mm(q, W, MM, PREC) - mm(qk, e, MM, PREC)
        if MOMENTUM:
            y += _load_vec(GD, tbase, t0, T, BC)[:, None] * mm(q, S, MM, PREC)
        _store_rows(Y, y, tbase, t0, T, v0, DV, BV, BC)
    w_end = _load_vec(GW, tbase, t0, T, BC)
    Wn = _load_last(GA, tbase, t0, T, BC) * W - mm(tl.trans(k), w_end[:, None] * e, MM, PREC)
    if MOMENTUM:
        Wn += _load_last(GD, tbase, t0, T, BC) * S
        s_end = _load_vec(GS, tbase, t0, T, BC)
        S = _load_last(GB, tbase, t0, T, BC) * S - mm(tl.trans(k), s_end[:, None] * e, MM, PREC)
    return Wn, S


@triton.jit
def titans_linear_fwd_kernel(
    Q, K, V, CT, GA, GD, GW, GS, GB, W0, S0, Y, WT, ST, CKW, CKS,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    nseg = tl.cdiv(NC, R)
    W, S = _load_state(W0, S0, bh, 0, v0, MOMENTUM, DK, DV, BK, BV)
    for ci in range(0, NC):
        if ci % R == 0:
            _store_state(CKW, CKS, bh * nseg + ci // R, 0, v0, W, S, MOMENTUM, DK, DV, BK, BV)
        W, S = _linear_chunk_fwd(
            Q, K, V, CT, GA, GD, GW, GS, GB, Y, W, S, bh * T, bh * NC + ci, ci * BC, T, v0, p, delta, eps,
            DK, DV, BK, BV, BC, MOMENTUM, BIAS, MM, PREC, True,
        )
    _store_state(WT, ST, bh, 0, v0, W, S, MOMENTUM, DK, DV, BK, BV)


@triton.jit
def _linear_chunk_bwd(
    Q, K, V, CT, GA, GD, GW, GS, GB, DY, DQP, DKP, DV_, DCT, DGA, DGD, DGW, DGS, DGB,
    W, S, dW, dS, tbase, cidx, t0, T, v0, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """Gradients of one chunk's column block given its start state (W, S) and the gradients (dW, dS)
    of its end state.

    Stores dv's block; stores (``SPLIT``: several value blocks, adds with fp32 atomics) this block's
    share of dq, dk and of the gate quantities' gradients; returns the gradients of (W, S). Ordered so
    that few ``[C, Dk]`` tiles are live at once: dq is finished and stored first, then q's other uses.
    """
    k = _load_rows_raw(K, tbase, t0, T, 0, DK, BK, BC)
    dy = _load_rows(DY, tbase, t0, T, v0, DV, BV, BC)
    A = _load_vec(GA, tbase, t0, T, BC)
    is_last = _is_last(t0, T, BC)
    r = mm(k, W, MM, PREC) - _load_rows(V, tbase, t0, T, v0, DV, BV, BC)
    e = bias_grad(r, BIAS, p, delta, eps)
    # Retrieval Y = A (Q W) + d (Q S) - (QK^T * ct) E.
    q = _load_rows_raw(Q, tbase, t0, T, 0, DK, BK, BC)
    qk = mm(q, tl.trans(k), MM, PREC)
    dP = mm(dy, tl.trans(e), MM, PREC)
    _store_cc(DCT, -(qk * dP), cidx, BC, SPLIT)
    ct = _load_cc(CT, cidx, BC)
    qk *= ct
    dP *= ct
    dq = A[:, None] * mm(dy, tl.trans(W), MM, PREC) - mm(dP, k, MM, PREC)
    if MOMENTUM:
        d = _load_vec(GD, tbase, t0, T, BC)
        dq += d[:, None] * mm(dy, tl.trans(S), MM, PREC)
    if SPLIT:
        _add_rows(DQP, dq, tbase, t0, T, 0, DK, BK, BC)
    else:
        _store_rows(DQP, dq, tbase, t0, T, 0, DK, BK, BC)
    dk = -mm(tl.trans(dP), q, MM, PREC)
    dA = tl.sum(mm(q, W, MM, PREC) * dy, 1) + tl.where(is_last, tl.sum(tl.sum(W * dW, 1), 0), 0.0)
    _store_vec(DGA, dA, tbase, t0, T, BC, SPLIT)
    dW0 = mm(tl.trans(q), A[:, None] * dy, MM, PREC) + _load_last(GA, tbase, t0, T, BC) * dW
    if MOMENTUM:
        dd = tl.sum(mm(q, S, MM, PREC) * dy, 1) + tl.where(is_last, tl.sum(tl.sum(S * dW, 1), 0), 0.0)
        _store_vec(DGD, dd, tbase, t0, T, BC, SPLIT)
        dS0 = (mm(tl.trans(q), d[:, None] * dy, MM, PREC) + _load_last(GD, tbase, t0, T, BC) * dW
               + _load_last(GB, tbase, t0, T, BC) * dS)
    else:
        dS0 = dS
    de = -mm(tl.trans(qk), dy, MM, PREC)
    # End state W' = A_last W + d_last S - K^T (w_end * E).
    w_end = _load_vec(GW, tbase, t0, T, BC)
    kdW = mm(k, dW, MM, PREC)
    de -= w_end[:, None] * kdW
    _store_vec(DGW, -tl.sum(kdW * e, 1), tbase, t0, T, BC, SPLIT)
    dk -= w_end[:, None] * mm(e, tl.trans(dW), MM, PREC)
    if MOMENTUM:
        s_end = _load_vec(GS, tbase, t0, T, BC)
        kdS = mm(k, dS, MM, PREC)
        de -= s_end[:, None] * kdS
        _store_vec(DGS, -tl.sum(kdS * e, 1), tbase, t0, T, BC, SPLIT)
        dk -= s_end[:, None] * mm(e, tl.trans(dS), MM, PREC)
        _store_vec(DGB, tl.where(is_last, tl.sum(tl.sum(S * dS, 1), 0), 0.0), tbase, t0, T, BC, SPLIT)
    # Per-token gradients E = g(K W - V).
    dr = de * bias_hess(r, BIAS, p, delta, eps)
    dk += mm(dr, tl.trans(W), MM, PREC)
    dW0 += mm(tl.trans(k), dr, MM, PREC)
    if SPLIT:
        _add_rows(DKP, dk, tbase, t0, T, 0, DK, BK, BC)
    else:
        _store_rows(DKP, dk, tbase, t0, T, 0, DK, BK, BC)
    _store_rows(DV_, -dr, tbase, t0, T, v0, DV, BV, BC)
    return dW0, dS0


@triton.jit
def titans_linear_bwd_kernel(
    Q, K, V, CT, GA, GD, GW, GS, GB, CKW, CKS, SCW, SCS, DY, DWT, DST,
    DQP, DKP, DV_, DCT, DGA, DGD, DGW, DGS, DGB, DW0, DS0,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """``SPLIT``: more than one value block (grid axis 1), so the gradients summed over value columns
    are added atomically into zeroed buffers."""
    bh = tl.program_id(0)
    vb = tl.program_id(1)
    v0 = vb * BV
    nbh = tl.num_programs(0)
    nseg = tl.cdiv(NC, R)
    # This program's scratch states.
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
                ci = seg * R + r
                W, S = _linear_chunk_fwd(
                    Q, K, V, CT, GA, GD, GW, GS, GB, Q, W, S, bh * T, bh * NC + ci, ci * BC, T, v0, p, delta, eps,
                    DK, DV, BK, BV, BC, MOMENTUM, BIAS, MM, PREC, False,
                )
        tl.debug_barrier()
        for rr in range(0, n_in):
            r = n_in - 1 - rr
            ci = seg * R + r
            W, S = _load_state(SCW, SCS, sc0 + r, 0, 0, MOMENTUM, BK, BV, BK, BV)
            dW, dS = _linear_chunk_bwd(
                Q, K, V, CT, GA, GD, GW, GS, GB, DY, DQP, DKP, DV_, DCT, DGA, DGD, DGW, DGS, DGB,
                W, S, dW, dS, bh * T, bh * NC + ci, ci * BC, T, v0, p, delta, eps,
                DK, DV, BK, BV, BC, MOMENTUM, BIAS, MM, PREC, SPLIT,
            )
        tl.debug_barrier()
    _store_state(DW0, DS0, bh, 0, v0, dW, dS, MOMENTUM, DK, DV, BK, BV)
