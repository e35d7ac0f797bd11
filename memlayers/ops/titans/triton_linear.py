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
segments in reverse, five launches each, so that no kernel holds another's tiles (in one kernel, a
64-token chunk's [C, C] products beside its [C, 64] terms spilled at head dim 64):

1. ``titans_linear_bwd_recompute_kernel`` recomputes the segment's chunk-start states into a
   scratch buffer of ``R`` states;
2. ``titans_linear_bwd_prep_kernel`` (one program per chunk) stores each chunk's ``E``, ``g'(K W - V)``
   and the retrieval's share of E's gradient, ``-((Q K^T) * ct)^T dY``, which no state gradient enters;
3. ``titans_linear_bwd_kernel``, the only sequential part, carries dW and dS through the chunks
   last to first in their output buffer (updated in place), keeping each chunk's end gradients in
   scratch and completing its ``dr`` (the residuals' gradient, hence dv);
4. ``titans_linear_bwd_grads_kernel`` (one program per chunk, launched for the queries' side and
   for the keys' side) computes dq, dk and the gate quantities' gradients from the scratch.

Every kernel streams the key rows in blocks of ``BKB`` (the keys and queries' columns with the
states' rows), so no ``[C, Dk]`` tile is held whole. The gradients that sum over value columns are
accumulated across column blocks with fp32 atomic adds (per-block copies would take Dv / BV times
their memory): ``dq``, ``dk`` and the gradients of the gate quantities, which
``titans_gates_bwd_kernel`` turns into those of theta, alpha and eta; ``dv`` and the state
gradients are columnwise and written in place.
"""
import triton
import triton.language as tl

from .triton_common import (
    _add_rows, _is_last, _load_cc, _load_last, _load_mat, _load_rows, _load_rows_raw, _load_state, _load_vec,
    _store_cc, _store_mat, _store_rows, _store_state, _store_vec, bias_grad, bias_hess, mm,
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


@triton.jit
def _segment_chunk(R, NC, seg):
    """Grid axis 2 of the per-chunk launches: ``(chunk index in the segment, chunk, whether it exists)``
    (the last segment may hold fewer than ``R`` chunks)."""
    r = tl.program_id(2)
    return r, seg * R + r, r < tl.minimum(R, NC - seg * R)


@triton.jit(do_not_specialize=["seg"])
def titans_linear_bwd_prep_kernel(
    Q, K, V, CT, DY, SCW, SCE, SCH, SCD, seg,
    T, NC, R, p, delta, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKB: tl.constexpr, BC: tl.constexpr,
    BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), from its chunk-start state in scratch:
    ``E = g(K W - V)``, ``g'(K W - V)`` and the part of E's gradient that no state gradient enters,
    ``-((Q K^T) * ct)^T dY`` (the retrieval's), into this chunk's ``[C, BV]`` scratch tiles."""
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = (tl.program_id(1) * tl.num_programs(0) + bh) * R + r
        tbase = bh * T
        t0 = ci * BC
        dy = _load_rows(DY, tbase, t0, T, v0, DV, BV, BC)
        ct = _load_cc(CT, bh * NC + ci, BC)
        res = -_load_rows(V, tbase, t0, T, v0, DV, BV, BC)
        de = tl.zeros([BC, BV], dtype=tl.float32)
        for k0 in range(0, BK, BKB):
            k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
            q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
            res += mm(k, _load_mat(SCW, sc, k0, 0, BK, BV, BKB, BV), MM, PREC)
            # (Q K^T * ct) sums over key blocks blockwise: the mask multiplies each block's share.
            de -= mm(tl.trans(mm(q, tl.trans(k), MM, PREC) * ct), dy, MM, PREC)
        _store_mat(SCE, sc, 0, 0, bias_grad(res, BIAS, p, delta, eps), BC, BV, BC, BV)
        _store_mat(SCH, sc, 0, 0, bias_hess(res, BIAS, p, delta, eps), BC, BV, BC, BV)
        _store_mat(SCD, sc, 0, 0, de, BC, BV, BC, BV)


@triton.jit(do_not_specialize=["seg"])
def titans_linear_bwd_kernel(
    Q, K, GA, GD, GW, GS, GB, DY, DV_, SCH, SCD, SGW, SGS, DW0, DS0, seg,
    T, NC, R,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """The sequential part: back-propagates the state gradients through segment ``seg``'s chunks,
    last to first. ``DW0, DS0`` hold the gradients of the segment's end state (the host copies the
    final state's there before the last segment) and are updated in place into those of its start
    state. Per chunk it keeps the chunk-end gradients in scratch (``SGW, SGS``), completes E's gradient
    and stores ``dr``, the gradient of the residuals ``K W - V``, over the prep kernel's part (``SCD``)
    and as ``-dv``."""
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    sc0 = (tl.program_id(1) * tl.num_programs(0) + bh) * R
    n_in = tl.minimum(R, NC - seg * R)
    tbase = bh * T
    for rr in range(0, n_in):
        r = n_in - 1 - rr
        ci = seg * R + r
        t0 = ci * BC
        sc = sc0 + r
        w_end = _load_vec(GW, tbase, t0, T, BC)
        # End state W' = A_last W + d_last S - K^T (w_end * E), S' = B_last S - K^T (s_end * E).
        de = _load_mat(SCD, sc, 0, 0, BC, BV, BC, BV)
        for k0 in range(0, BK, BKB):
            k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
            dW, dS = _load_state(DW0, DS0, bh, k0, v0, MOMENTUM, DK, DV, BKB, BV)
            _store_state(SGW, SGS, sc, k0, 0, dW, dS, MOMENTUM, BK, BV, BKB, BV)
            de -= w_end[:, None] * mm(k, dW, MM, PREC)
            if MOMENTUM:
                de -= _load_vec(GS, tbase, t0, T, BC)[:, None] * mm(k, dS, MM, PREC)
        dr = de * _load_mat(SCH, sc, 0, 0, BC, BV, BC, BV)
        _store_rows(DV_, -dr, tbase, t0, T, v0, DV, BV, BC)
        tl.debug_barrier()  # every read of SCD's tile and of the end state's gradients is done
        _store_mat(SCD, sc, 0, 0, dr, BC, BV, BC, BV)
        # The start state's gradients, block by block.
        dy = _load_rows(DY, tbase, t0, T, v0, DV, BV, BC)
        A = _load_vec(GA, tbase, t0, T, BC)
        a_last = _load_last(GA, tbase, t0, T, BC)
        for k0 in range(0, BK, BKB):
            k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
            q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
            dW, dS = _load_state(SGW, SGS, sc, k0, 0, MOMENTUM, BK, BV, BKB, BV)
            gW = mm(tl.trans(q), A[:, None] * dy, MM, PREC) + a_last * dW + mm(tl.trans(k), dr, MM, PREC)
            if MOMENTUM:
                d = _load_vec(GD, tbase, t0, T, BC)
                gS = (mm(tl.trans(q), d[:, None] * dy, MM, PREC) + _load_last(GD, tbase, t0, T, BC) * dW
                      + _load_last(GB, tbase, t0, T, BC) * dS)
            else:
                gS = dS
            _store_state(DW0, DS0, bh, k0, v0, gW, gS, MOMENTUM, DK, DV, BKB, BV)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["seg"])
def titans_linear_bwd_grads_kernel(
    Q, K, CT, GA, GD, GW, GS, DY, DQP, DKP, DCT, DGA, DGD, DGW, DGS, DGB, SCW, SCS, SCE, SCD, SGW, SGS, seg,
    T, NC, R,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BKB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr, KEYS: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), once the sequential kernel has run: this
    value block's share of the gradients that no later chunk needs, from the chunk's start state, its
    end state's gradients, ``E`` and ``dr`` in scratch. Launched twice, so that each launch holds half
    the operands: the queries' side (``KEYS`` False: dq, ct's gradient, those of ``A``, ``d``, ``B``)
    and the keys' side (dk, those of ``w_end``, ``s_end``). Stores them (``SPLIT``: several value
    blocks, adds with fp32 atomics into zeroed buffers)."""
    bh = tl.program_id(0)
    v0 = tl.program_id(1) * BV
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = (tl.program_id(1) * tl.num_programs(0) + bh) * R + r
        tbase = bh * T
        t0 = ci * BC
        cidx = bh * NC + ci
        dy = _load_rows(DY, tbase, t0, T, v0, DV, BV, BC)
        e = _load_mat(SCE, sc, 0, 0, BC, BV, BC, BV)
        # Retrieval Y = A (Q W) + d (Q S) - (QK^T * ct) E: dP = dY E^T.
        dP = mm(dy, tl.trans(e), MM, PREC)
        if KEYS:
            # End state W' = A_last W + d_last S - K^T (w_end * E), S' = B_last S - K^T (s_end * E);
            # residuals K W - V.
            dPc = dP * _load_cc(CT, cidx, BC)
            w_end = _load_vec(GW, tbase, t0, T, BC)
            dr = _load_mat(SCD, sc, 0, 0, BC, BV, BC, BV)
            dw_end = tl.zeros([BC], dtype=tl.float32)
            ds_end = tl.zeros([BC], dtype=tl.float32)
            for k0 in range(0, BK, BKB):
                k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
                q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
                W = _load_mat(SCW, sc, k0, 0, BK, BV, BKB, BV)
                dW, dS = _load_state(SGW, SGS, sc, k0, 0, MOMENTUM, BK, BV, BKB, BV)
                dw_end -= tl.sum(mm(k, dW, MM, PREC) * e, 1)
                dk = mm(dr, tl.trans(W), MM, PREC) - mm(tl.trans(dPc), q, MM, PREC) - w_end[:, None] * mm(e, tl.trans(dW), MM, PREC)
                if MOMENTUM:
                    ds_end -= tl.sum(mm(k, dS, MM, PREC) * e, 1)
                    dk -= _load_vec(GS, tbase, t0, T, BC)[:, None] * mm(e, tl.trans(dS), MM, PREC)
                if SPLIT:
                    _add_rows(DKP, dk, tbase, t0, T, k0, DK, BKB, BC)
                else:
                    _store_rows(DKP, dk, tbase, t0, T, k0, DK, BKB, BC)
            _store_vec(DGW, dw_end, tbase, t0, T, BC, SPLIT)
            if MOMENTUM:
                _store_vec(DGS, ds_end, tbase, t0, T, BC, SPLIT)
        else:
            ct = _load_cc(CT, cidx, BC)
            A = _load_vec(GA, tbase, t0, T, BC)
            is_last = _is_last(t0, T, BC)
            dct = tl.zeros([BC, BC], dtype=tl.float32)
            dA = tl.zeros([BC], dtype=tl.float32)
            dd = tl.zeros([BC], dtype=tl.float32)
            w_dw = 0.0
            s_dw = 0.0
            s_ds = 0.0
            for k0 in range(0, BK, BKB):
                k = _load_rows_raw(K, tbase, t0, T, k0, DK, BKB, BC)
                q = _load_rows_raw(Q, tbase, t0, T, k0, DK, BKB, BC)
                W, S = _load_state(SCW, SCS, sc, k0, 0, MOMENTUM, BK, BV, BKB, BV)
                dW, dS = _load_state(SGW, SGS, sc, k0, 0, MOMENTUM, BK, BV, BKB, BV)
                dct -= mm(q, tl.trans(k), MM, PREC) * dP
                dA += tl.sum(mm(q, W, MM, PREC) * dy, 1)
                w_dw += tl.sum(tl.sum(W * dW, 1), 0)
                dq = A[:, None] * mm(dy, tl.trans(W), MM, PREC) - mm(dP * ct, k, MM, PREC)
                if MOMENTUM:
                    dd += tl.sum(mm(q, S, MM, PREC) * dy, 1)
                    s_dw += tl.sum(tl.sum(S * dW, 1), 0)
                    s_ds += tl.sum(tl.sum(S * dS, 1), 0)
                    dq += _load_vec(GD, tbase, t0, T, BC)[:, None] * mm(dy, tl.trans(S), MM, PREC)
                if SPLIT:
                    _add_rows(DQP, dq, tbase, t0, T, k0, DK, BKB, BC)
                else:
                    _store_rows(DQP, dq, tbase, t0, T, k0, DK, BKB, BC)
            _store_cc(DCT, dct, cidx, BC, SPLIT)
            _store_vec(DGA, dA + tl.where(is_last, w_dw, 0.0), tbase, t0, T, BC, SPLIT)
            if MOMENTUM:
                _store_vec(DGD, dd + tl.where(is_last, s_dw, 0.0), tbase, t0, T, BC, SPLIT)
                _store_vec(DGB, tl.where(is_last, s_ds, 0.0), tbase, t0, T, BC, SPLIT)
