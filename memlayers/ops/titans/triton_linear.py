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
segments in reverse, two launches each: one recomputes the segment's chunk-start states into a
scratch buffer of ``R`` states, the other back-propagates through its chunks last to first, carrying dW and dS in their output
buffer (updated in place). A backward chunk streams its key rows in blocks of ``BKB`` (the keys
and queries' columns with the states' rows): one pass sums what needs every key dimension
(``K W``, ``Q K^T``, ``K dW``, ...), a second computes each block's share of dq and dk, a third
the start state's gradients, so no ``[C, Dk]`` tile is held whole. The gradients
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
    SCW, SCS, sidx, GW0, GS0, gidx, tbase, cidx, t0, T, v0, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """Gradients of chunk ``cidx``'s column block from its start state (scratch ``sidx`` of ``SCW``,
    ``SCS``) and its end state's gradients (``[Dk, BV]`` block ``gidx``, ``v0`` of ``GW0``, ``GS0``),
    which are overwritten with the start state's.

    Stores dv's block; stores (``SPLIT``: several value blocks, adds with fp32 atomics) this block's
    share of dq, dk and of the gate quantities' gradients.
    """
    dy = _load_rows(DY, tbase, t0, T, v0, DV, BV, BC)
    A = _load_vec(GA, tbase, t0, T, BC)
    is_last = _is_last(t0, T, BC)
    # Pass 1: the sums over key dimensions.
    r = -_load_rows(V, tbase, t0, T, v0, DV, BV, BC)
    dA = tl.zeros([BC], dtype=tl.float32)
    kdw = tl.zeros([BC, BV], dtype=tl.float32)
    dd = tl.zeros([BC], dtype=tl.float32)
    kds = tl.zeros([BC, BV], dtype=tl.float32)
    qk = tl.zeros([BC, BC], dtype=tl.float32)
    w_dw = 0.0
    s_dw = 0.0
    s_ds = 0.0
    for k0 in range(0, BK, BKB):
        k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
        q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
        W, S = _load_state(SCW, SCS, sidx, k0, 0, MOMENTUM, BK, BV, BKB, BV)
        dW, dS = _load_state(GW0, GS0, gidx, k0, v0, MOMENTUM, DK, DV, BKB, BV)
        r += mm(k, W, MM, PREC)
        dA += tl.sum(mm(q, W, MM, PREC) * dy, 1)
        kdw += mm(k, dW, MM, PREC)
        qk += mm(q, tl.trans(k), MM, PREC)
        w_dw += tl.sum(tl.sum(W * dW, 1), 0)
        if MOMENTUM:
            dd += tl.sum(mm(q, S, MM, PREC) * dy, 1)
            kds += mm(k, dS, MM, PREC)
            s_dw += tl.sum(tl.sum(S * dW, 1), 0)
            s_ds += tl.sum(tl.sum(S * dS, 1), 0)
    e = bias_grad(r, BIAS, p, delta, eps)
    # Retrieval Y = A (Q W) + d (Q S) - (QK^T * ct) E.
    dP = mm(dy, tl.trans(e), MM, PREC)
    _store_cc(DCT, -(qk * dP), cidx, BC, SPLIT)
    ct = _load_cc(CT, cidx, BC)
    de = -mm(tl.trans(qk * ct), dy, MM, PREC)
    dP *= ct
    _store_vec(DGA, dA + tl.where(is_last, w_dw, 0.0), tbase, t0, T, BC, SPLIT)
    # End state W' = A_last W + d_last S - K^T (w_end * E), S' = B_last S - K^T (s_end * E).
    w_end = _load_vec(GW, tbase, t0, T, BC)
    de -= w_end[:, None] * kdw
    _store_vec(DGW, -tl.sum(kdw * e, 1), tbase, t0, T, BC, SPLIT)
    if MOMENTUM:
        d = _load_vec(GD, tbase, t0, T, BC)
        s_end = _load_vec(GS, tbase, t0, T, BC)
        _store_vec(DGD, dd + tl.where(is_last, s_dw, 0.0), tbase, t0, T, BC, SPLIT)
        de -= s_end[:, None] * kds
        _store_vec(DGS, -tl.sum(kds * e, 1), tbase, t0, T, BC, SPLIT)
        _store_vec(DGB, tl.where(is_last, s_ds, 0.0), tbase, t0, T, BC, SPLIT)
        d_last = _load_last(GD, tbase, t0, T, BC)
        b_last = _load_last(GB, tbase, t0, T, BC)
    else:
        d = tl.zeros([BC], dtype=tl.float32)
        s_end = tl.zeros([BC], dtype=tl.float32)
    # Per-token gradients E = g(K W - V).
    dr = de * bias_hess(r, BIAS, p, delta, eps)
    _store_rows(DV_, -dr, tbase, t0, T, v0, DV, BV, BC)
    a_last = _load_last(GA, tbase, t0, T, BC)
    # Pass 2: each key block's share of dq and dk.
    for k0 in range(0, BK, BKB):
        k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
        q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
        W, S = _load_state(SCW, SCS, sidx, k0, 0, MOMENTUM, BK, BV, BKB, BV)
        dW, dS = _load_state(GW0, GS0, gidx, k0, v0, MOMENTUM, DK, DV, BKB, BV)
        dq = A[:, None] * mm(dy, tl.trans(W), MM, PREC) - mm(dP, k, MM, PREC)
        dk = mm(dr, tl.trans(W), MM, PREC) - mm(tl.trans(dP), q, MM, PREC) - w_end[:, None] * mm(e, tl.trans(dW), MM, PREC)
        if MOMENTUM:
            dq += d[:, None] * mm(dy, tl.trans(S), MM, PREC)
            dk -= s_end[:, None] * mm(e, tl.trans(dS), MM, PREC)
        if SPLIT:
            _add_rows(DQP, dq, tbase, t0, T, k0, DK, BKB, BC)
            _add_rows(DKP, dk, tbase, t0, T, k0, DK, BKB, BC)
        else:
            _store_rows(DQP, dq, tbase, t0, T, k0, DK, BKB, BC)
            _store_rows(DKP, dk, tbase, t0, T, k0, DK, BKB, BC)
    tl.debug_barrier()  # every read of the end state's gradients comes before pass 3 overwrites them
    # Pass 3: the start state's gradients, block by block.
    for k0 in range(0, BK, BKB):
        k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
        q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
        dW, dS = _load_state(GW0, GS0, gidx, k0, v0, MOMENTUM, DK, DV, BKB, BV)
        gW = mm(tl.trans(q), A[:, None] * dy, MM, PREC) + a_last * dW + mm(tl.trans(k), dr, MM, PREC)
        if MOMENTUM:
            gS = mm(tl.trans(q), d[:, None] * dy, MM, PREC) + d_last * dW + b_last * dS
        else:
            gS = dS
        _store_state(GW0, GS0, gidx, k0, v0, gW, gS, MOMENTUM, DK, DV, BKB, BV)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["seg"])
def titans_linear_bwd_recompute_kernel(
    Q, K, V, CT, GA, GD, GW, GS, GB, CKW, CKS, SCW, SCS, seg,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """Segment ``seg``'s chunk-start states, recomputed from its checkpoint into this program's
    scratch (a launch of its own: in the backward kernel, its registers added to the chunk's)."""
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    nseg = tl.cdiv(NC, R)
    sc0 = (tl.program_id(1) * tl.num_programs(0) + bh) * R
    n_in = tl.minimum(R, NC - seg * R)
    W, S = _load_state(CKW, CKS, bh * nseg + seg, 0, v0, MOMENTUM, DK, DV, BK, BV)
    for r in range(0, n_in):
        _store_state(SCW, SCS, sc0 + r, 0, 0, W, S, MOMENTUM, BK, BV, BK, BV)
        if r < n_in - 1:
            ci = seg * R + r
            W, S = _linear_chunk_fwd(
                Q, K, V, CT, GA, GD, GW, GS, GB, Q, W, S, bh * T, bh * NC + ci, ci * BC, T, v0, p, delta, eps,
                DK, DV, BK, BV, BC, MOMENTUM, BIAS, MM, PREC, False,
            )


@triton.jit(do_not_specialize=["seg"])
def titans_linear_bwd_kernel(
    Q, K, V, CT, GA, GD, GW, GS, GB, SCW, SCS, DY,
    DQP, DKP, DV_, DCT, DGA, DGD, DGW, DGS, DGB, DW0, DS0, seg,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
):
    """Back-propagates through segment ``seg``'s chunks, last to first, from the chunk-start states
    the recompute kernel left in this program's scratch. ``DW0, DS0`` hold the gradients of the
    segment's end state (the host copies the final state's there before the last segment) and are
    updated in place into those of its start state. ``SPLIT``: more than one value block (grid axis
    1), so the gradients summed over value columns are added atomically into zeroed buffers."""
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    sc0 = (tl.program_id(1) * tl.num_programs(0) + bh) * R
    n_in = tl.minimum(R, NC - seg * R)
    for rr in range(0, n_in):
        r = n_in - 1 - rr
        ci = seg * R + r
        _linear_chunk_bwd(
            Q, K, V, CT, GA, GD, GW, GS, GB, DY, DQP, DKP, DV_, DCT, DGA, DGD, DGW, DGS, DGB,
            SCW, SCS, sc0 + r, DW0, DS0, bh, bh * T, bh * NC + ci, ci * BC, T, v0, p, delta, eps,
            DK, DV, BK, BV, BKB, BC, MOMENTUM, BIAS, MM, PREC, SPLIT,
        )
