"""Triton kernels of the deep Titans memory: the residual MLP ``M(x) = x + silu(x W1) W2`` per head.

A chunk, with the keys' activations at the chunk-start weights ``Z = K W1``, ``Hk = silu(Z)``:

    E = g(K + Hk W2 - V)                         # layer-2 per-token gradients: Hk_j^T e_j
    U = (E W2^T) * silu'(Z)                      # layer-1 per-token gradients: k_j^T u_j
    Zq = A (Q W1) + d (Q S1) - ((Q K^T) * c * theta) U          # queries through token-level W1_i
    Y  = Q + A (Hq W2) + d (Hq S2) - ((Hq Hk^T) * c * theta) E  # Hq = silu(Zq), token-level W2_i

so retrieval with every token's own weights is exact without materializing them.

Decomposition (why it fits): the hidden activations couple every value column (``E`` needs the
whole sum over the hidden layer), so the state cannot be split over value columns as the linear
memory's is. It is split over the hidden dimension instead, inside one program per (batch, head):
the four state matrices ``W1 [D, Dh]``, ``W2 [Dh, D]``, ``S1``, ``S2`` live in global memory (fp32,
L2-resident) and are streamed through registers in blocks of ``BHB`` hidden units, ``W1[:, h]`` with
``W2[h, :]``. Everything a block needs from the other blocks is a sum over the hidden dimension, so
each chunk is a few passes over the blocks with ``[C, D]`` / ``[C, C]`` accumulators between them:

- forward: pass 1 accumulates ``Hk W2`` (the residuals, hence ``E``); pass 2 computes each block's
  ``U``, ``Zq``, ``Hq``, accumulates ``Hq W2`` and ``Hq Hk^T`` for ``Y`` and writes the block's
  updated state in place;
- backward: pass A recomputes ``E``; pass B accumulates what the per-token gradients need from all
  blocks (``Hq Hk^T``, ``dZq U^T``, ``dq``, ``de``, gate terms); pass C recomputes each block's
  terms and writes its state gradients in place, accumulating ``dk``.

No dot operand is larger than ``[C, max(D, BHB)]`` whatever the hidden size, and the state never
has to fit on chip. The forward stores the state every ``R`` chunks; the backward recomputes one
segment of ``R`` chunk-start states at a time into a scratch buffer (see ``triton.py``).
"""
import triton
import triton.language as tl

from .triton_common import (
    _is_last, _load_cc, _load_last, _load_mat, _load_rows, _load_rows_raw, _load_state, _load_vec, _store_cc,
    _store_rows, _store_state, _store_vec, bias_grad, bias_hess, mm,
)


@triton.jit
def _silu_parts(z):
    """silu(z), its first derivative and the sigmoid."""
    s = tl.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s)), s


@triton.jit
def _load_block(PW1, PW2, PS1, PS2, idx, h0, MOMENTUM: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                BD: tl.constexpr, BHB: tl.constexpr):
    """Hidden block ``h0 .. h0+BHB`` of matrix ``idx``: ``W1[:, h] [BD, BHB]``, ``W2[h, :] [BHB, BD]``, ``S1``, ``S2``."""
    W1, S1 = _load_state(PW1, PS1, idx, 0, h0, MOMENTUM, D, DH, BD, BHB)
    W2, S2 = _load_state(PW2, PS2, idx, h0, 0, MOMENTUM, DH, D, BHB, BD)
    return W1, W2, S1, S2


@triton.jit
def _store_block(PW1, PW2, PS1, PS2, idx, h0, W1, W2, S1, S2, MOMENTUM: tl.constexpr, D: tl.constexpr,
                 DH: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr):
    _store_state(PW1, PS1, idx, 0, h0, W1, S1, MOMENTUM, D, DH, BD, BHB)
    _store_state(PW2, PS2, idx, h0, 0, W2, S2, MOMENTUM, DH, D, BHB, BD)


@triton.jit
def _copy_states(SW1, SW2, SS1, SS2, sidx, DW1, DW2, DS1, DS2, didx, MOMENTUM: tl.constexpr, D: tl.constexpr,
                 DH: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr):
    """Copy all four state matrices ``sidx`` -> ``didx``, block by block."""
    for h0 in range(0, DH, BHB):
        W1, W2, S1, S2 = _load_block(SW1, SW2, SS1, SS2, sidx, h0, MOMENTUM, D, DH, BD, BHB)
        _store_block(DW1, DW2, DS1, DS2, didx, h0, W1, W2, S1, S2, MOMENTUM, D, DH, BD, BHB)


@triton.jit
def _mlp_chunk_fwd(
    Q, K, V, CT, GA, GD, GW, GS, GB, Y, SW1, SW2, SS1, SS2, sidx, DW1, DW2, DS1, DS2, didx, tbase, cidx, t0, T,
    p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, WRITE_Y: tl.constexpr,
):
    """Chunk ``cidx`` (tokens from ``t0``) from state ``sidx`` to state ``didx`` (may be the same:
    each block is read before it is written); stores the retrieval with ``WRITE_Y``."""
    k = _load_rows_raw(K, tbase, t0, T, 0, D, BD, BC)
    r = k.to(tl.float32) - _load_rows(V, tbase, t0, T, 0, D, BD, BC)
    for h0 in range(0, DH, BHB):
        W1 = _load_mat(SW1, sidx, 0, h0, D, DH, BD, BHB)
        W2 = _load_mat(SW2, sidx, h0, 0, DH, D, BHB, BD)
        z = mm(k, W1, MM, PREC)
        r += mm(z * tl.sigmoid(z), W2, MM, PREC)
    e = bias_grad(r, BIAS, p, delta, eps)
    w_end = _load_vec(GW, tbase, t0, T, BC)
    a_last = _load_last(GA, tbase, t0, T, BC)
    if MOMENTUM:
        d_last = _load_last(GD, tbase, t0, T, BC)
        s_end = _load_vec(GS, tbase, t0, T, BC)
        b_last = _load_last(GB, tbase, t0, T, BC)
    if WRITE_Y:
        q = _load_rows_raw(Q, tbase, t0, T, 0, D, BD, BC)
        ct = _load_cc(CT, cidx, BC)
        A = _load_vec(GA, tbase, t0, T, BC)
        if MOMENTUM:
            d = _load_vec(GD, tbase, t0, T, BC)
        qk = mm(q, tl.trans(k), MM, PREC)
        y = q.to(tl.float32)
        hh = tl.zeros([BC, BC], dtype=tl.float32)
    tl.debug_barrier()
    for h0 in range(0, DH, BHB):
        W1, W2, S1, S2 = _load_block(SW1, SW2, SS1, SS2, sidx, h0, MOMENTUM, D, DH, BD, BHB)
        z = mm(k, W1, MM, PREC)
        hk, dsilu, _s = _silu_parts(z)
        u = mm(e, tl.trans(W2), MM, PREC) * dsilu
        if WRITE_Y:
            zq = A[:, None] * mm(q, W1, MM, PREC) - mm(qk * ct, u, MM, PREC)
            if MOMENTUM:
                zq += d[:, None] * mm(q, S1, MM, PREC)
            hq = zq * tl.sigmoid(zq)
            hh += mm(hq, tl.trans(hk), MM, PREC)
            y += A[:, None] * mm(hq, W2, MM, PREC)
            if MOMENTUM:
                y += d[:, None] * mm(hq, S2, MM, PREC)
        W1n = a_last * W1 - mm(tl.trans(k), w_end[:, None] * u, MM, PREC)
        W2n = a_last * W2 - mm(tl.trans(hk), w_end[:, None] * e, MM, PREC)
        if MOMENTUM:
            W1n += d_last * S1
            W2n += d_last * S2
            S1 = b_last * S1 - mm(tl.trans(k), s_end[:, None] * u, MM, PREC)
            S2 = b_last * S2 - mm(tl.trans(hk), s_end[:, None] * e, MM, PREC)
        _store_block(DW1, DW2, DS1, DS2, didx, h0, W1n, W2n, S1, S2, MOMENTUM, D, DH, BD, BHB)
    if WRITE_Y:
        y -= mm(hh * ct, e, MM, PREC)
        _store_rows(Y, y, tbase, t0, T, 0, D, BD, BC)
    tl.debug_barrier()


@triton.jit
def titans_mlp_fwd_kernel(
    Q, K, V, CT, GA, GD, GW, GS, GB, W1T, W2T, S1T, S2T, Y, CKW1, CKW2, CKS1, CKS2,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """``W1T, W2T, S1T, S2T`` hold the initial state (the host copies it there) and are updated in
    place, chunk by chunk, into the final state."""
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    for ci in range(0, NC):
        if ci % R == 0:
            _copy_states(W1T, W2T, S1T, S2T, bh, CKW1, CKW2, CKS1, CKS2, bh * nseg + ci // R, MOMENTUM, D, DH, BD, BHB)
            tl.debug_barrier()
        _mlp_chunk_fwd(
            Q, K, V, CT, GA, GD, GW, GS, GB, Y, W1T, W2T, S1T, S2T, bh, W1T, W2T, S1T, S2T, bh, bh * T, bh * NC + ci,
            ci * BC, T, p, delta, eps, D, DH, BD, BHB, BC, MOMENTUM, BIAS, MM, PREC, True,
        )


@triton.jit
def _mlp_block_terms(
    q, k, e, dy, qk, ct, p2, A, d, w_end, s_end, W1, W2, S1, S2, dW1n, dS1n,
    MOMENTUM: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """A hidden block's recomputed forward and backward terms, which need only its own columns."""
    z = mm(k, W1, MM, PREC)
    hk, dsilu, sg = _silu_parts(z)
    ew = mm(e, tl.trans(W2), MM, PREC)
    u = ew * dsilu
    qw1 = mm(q, W1, MM, PREC)
    zq = A[:, None] * qw1 - mm(qk * ct, u, MM, PREC)
    dyw2 = mm(dy, tl.trans(W2), MM, PREC)
    dhq = A[:, None] * dyw2 - mm(p2 * ct, hk, MM, PREC)
    kdw1 = mm(k, dW1n, MM, PREC)
    du = -w_end[:, None] * kdw1
    if MOMENTUM:
        qs1 = mm(q, S1, MM, PREC)
        zq += d[:, None] * qs1
        dys2 = mm(dy, tl.trans(S2), MM, PREC)
        dhq += d[:, None] * dys2
        kds1 = mm(k, dS1n, MM, PREC)
        du -= s_end[:, None] * kds1
    else:
        qs1 = tl.zeros_like(qw1)
        dys2 = tl.zeros_like(qw1)
        kds1 = tl.zeros_like(qw1)
    hq, dsilu_q, _sq = _silu_parts(zq)
    dzq = dhq * dsilu_q
    du -= mm(tl.trans(qk * ct), dzq, MM, PREC)
    dew = du * dsilu
    return z, hk, dsilu, sg, ew, u, qw1, qs1, hq, dyw2, dys2, dzq, kdw1, kds1, du, dew


@triton.jit
def _mlp_chunk_bwd(
    Q, K, V, CT, GA, GD, GW, GS, GB, DY, DQ, DK_, DV_, DCT, DGA, DGD, DGW, DGS, DGB,
    SW1, SW2, SS1, SS2, sidx, GW1, GW2, GS1, GS2, gidx, tbase, cidx, t0, T, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """Gradients of chunk ``cidx`` (tokens from ``t0``) from its start state ``sidx`` and its end
    state's gradients ``gidx``, which are overwritten, block by block, with the start state's
    gradients. Stores dq, dk, dv and the gradients of the chunk's gate quantities."""
    q = _load_rows_raw(Q, tbase, t0, T, 0, D, BD, BC)
    k = _load_rows_raw(K, tbase, t0, T, 0, D, BD, BC)
    dy = _load_rows(DY, tbase, t0, T, 0, D, BD, BC)
    ct = _load_cc(CT, cidx, BC)
    A = _load_vec(GA, tbase, t0, T, BC)
    w_end = _load_vec(GW, tbase, t0, T, BC)
    a_last = _load_last(GA, tbase, t0, T, BC)
    is_last = _is_last(t0, T, BC)
    if MOMENTUM:
        d = _load_vec(GD, tbase, t0, T, BC)
        d_last = _load_last(GD, tbase, t0, T, BC)
        s_end = _load_vec(GS, tbase, t0, T, BC)
        b_last = _load_last(GB, tbase, t0, T, BC)
    else:
        d = tl.zeros([BC], dtype=tl.float32)
        s_end = tl.zeros([BC], dtype=tl.float32)
    # Pass A: residuals r = K + Hk W2 - V.
    r = k.to(tl.float32) - _load_rows(V, tbase, t0, T, 0, D, BD, BC)
    for h0 in range(0, DH, BHB):
        W1 = _load_mat(SW1, sidx, 0, h0, D, DH, BD, BHB)
        W2 = _load_mat(SW2, sidx, h0, 0, DH, D, BHB, BD)
        z = mm(k, W1, MM, PREC)
        r += mm(z * tl.sigmoid(z), W2, MM, PREC)
    e = bias_grad(r, BIAS, p, delta, eps)
    qk = mm(q, tl.trans(k), MM, PREC)
    p2 = mm(dy, tl.trans(e), MM, PREC)
    # Pass B: the sums over hidden units that the per-token gradients need.
    hh = tl.zeros([BC, BC], dtype=tl.float32)
    p1 = tl.zeros([BC, BC], dtype=tl.float32)
    dq = dy
    dk = tl.zeros([BC, BD], dtype=tl.float32)
    de = tl.zeros([BC, BD], dtype=tl.float32)
    dA = tl.zeros([BC], dtype=tl.float32)
    dd = tl.zeros([BC], dtype=tl.float32)
    dw_end = tl.zeros([BC], dtype=tl.float32)
    ds_end = tl.zeros([BC], dtype=tl.float32)
    dA_last = 0.0
    dd_last = 0.0
    db_end = 0.0
    for h0 in range(0, DH, BHB):
        W1, W2, S1, S2 = _load_block(SW1, SW2, SS1, SS2, sidx, h0, MOMENTUM, D, DH, BD, BHB)
        dW1n, dW2n, dS1n, dS2n = _load_block(GW1, GW2, GS1, GS2, gidx, h0, MOMENTUM, D, DH, BD, BHB)
        z, hk, dsilu, sg, ew, u, qw1, qs1, hq, dyw2, dys2, dzq, kdw1, kds1, du, dew = _mlp_block_terms(
            q, k, e, dy, qk, ct, p2, A, d, w_end, s_end, W1, W2, S1, S2, dW1n, dS1n, MOMENTUM, MM, PREC,
        )
        hh += mm(hq, tl.trans(hk), MM, PREC)
        p1 += mm(dzq, tl.trans(u), MM, PREC)
        dq += A[:, None] * mm(dzq, tl.trans(W1), MM, PREC)
        dA += tl.sum(hq * dyw2, 1) + tl.sum(qw1 * dzq, 1)
        dw_end -= tl.sum(kdw1 * u, 1) + tl.sum(hk * mm(e, tl.trans(dW2n), MM, PREC), 1)
        de += mm(dew, W2, MM, PREC) - w_end[:, None] * mm(hk, dW2n, MM, PREC)
        dk -= w_end[:, None] * mm(u, tl.trans(dW1n), MM, PREC)
        dA_last += tl.sum(tl.sum(W1 * dW1n, 1), 0) + tl.sum(tl.sum(W2 * dW2n, 1), 0)
        if MOMENTUM:
            dq += d[:, None] * mm(dzq, tl.trans(S1), MM, PREC)
            dd += tl.sum(hq * dys2, 1) + tl.sum(qs1 * dzq, 1)
            ds_end -= tl.sum(kds1 * u, 1) + tl.sum(hk * mm(e, tl.trans(dS2n), MM, PREC), 1)
            de -= s_end[:, None] * mm(hk, dS2n, MM, PREC)
            dk -= s_end[:, None] * mm(u, tl.trans(dS1n), MM, PREC)
            dd_last += tl.sum(tl.sum(S1 * dW1n, 1), 0) + tl.sum(tl.sum(S2 * dW2n, 1), 0)
            db_end += tl.sum(tl.sum(S1 * dS1n, 1), 0) + tl.sum(tl.sum(S2 * dS2n, 1), 0)
    dct = -(hh * p2) - qk * p1
    dq -= mm(p1 * ct, k, MM, PREC)
    dk -= mm(tl.trans(p1 * ct), q, MM, PREC)
    de -= mm(tl.trans(hh * ct), dy, MM, PREC)
    dr = de * bias_hess(r, BIAS, p, delta, eps)
    dk += dr
    _store_rows(DQ, dq, tbase, t0, T, 0, D, BD, BC)
    _store_rows(DV_, -dr, tbase, t0, T, 0, D, BD, BC)
    _store_cc(DCT, dct, cidx, BC, False)
    _store_vec(DGA, dA + tl.where(is_last, dA_last, 0.0), tbase, t0, T, BC, False)
    _store_vec(DGW, dw_end, tbase, t0, T, BC, False)
    if MOMENTUM:
        _store_vec(DGD, dd + tl.where(is_last, dd_last, 0.0), tbase, t0, T, BC, False)
        _store_vec(DGS, ds_end, tbase, t0, T, BC, False)
        _store_vec(DGB, tl.where(is_last, db_end, 0.0), tbase, t0, T, BC, False)
    tl.debug_barrier()
    # Pass C: each block's state gradients (in place) and its share of dk.
    for h0 in range(0, DH, BHB):
        W1, W2, S1, S2 = _load_block(SW1, SW2, SS1, SS2, sidx, h0, MOMENTUM, D, DH, BD, BHB)
        dW1n, dW2n, dS1n, dS2n = _load_block(GW1, GW2, GS1, GS2, gidx, h0, MOMENTUM, D, DH, BD, BHB)
        z, hk, dsilu, sg, ew, u, qw1, qs1, hq, dyw2, dys2, dzq, kdw1, kds1, du, dew = _mlp_block_terms(
            q, k, e, dy, qk, ct, p2, A, d, w_end, s_end, W1, W2, S1, S2, dW1n, dS1n, MOMENTUM, MM, PREC,
        )
        dhk = mm(dr, tl.trans(W2), MM, PREC) - mm(tl.trans(p2 * ct), hq, MM, PREC)
        dhk -= w_end[:, None] * mm(e, tl.trans(dW2n), MM, PREC)
        if MOMENTUM:
            dhk -= s_end[:, None] * mm(e, tl.trans(dS2n), MM, PREC)
        dz = du * ew * (sg * (1.0 - sg) * (2.0 + z * (1.0 - 2.0 * sg))) + dhk * dsilu
        dk += mm(dz, tl.trans(W1), MM, PREC)
        gW1 = mm(tl.trans(q), A[:, None] * dzq, MM, PREC) + a_last * dW1n + mm(tl.trans(k), dz, MM, PREC)
        gW2 = (mm(tl.trans(hq), A[:, None] * dy, MM, PREC) + a_last * dW2n + mm(tl.trans(dew), e, MM, PREC)
               + mm(tl.trans(hk), dr, MM, PREC))
        if MOMENTUM:
            gS1 = mm(tl.trans(q), d[:, None] * dzq, MM, PREC) + d_last * dW1n + b_last * dS1n
            gS2 = mm(tl.trans(hq), d[:, None] * dy, MM, PREC) + d_last * dW2n + b_last * dS2n
        else:
            gS1 = dS1n
            gS2 = dS2n
        _store_block(GW1, GW2, GS1, GS2, gidx, h0, gW1, gW2, gS1, gS2, MOMENTUM, D, DH, BD, BHB)
    _store_rows(DK_, dk, tbase, t0, T, 0, D, BD, BC)
    tl.debug_barrier()


@triton.jit
def titans_mlp_bwd_kernel(
    Q, K, V, CT, GA, GD, GW, GS, GB, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2, DY, GW1, GW2, GS1, GS2,
    DQ, DK_, DV_, DCT, DGA, DGD, DGW, DGS, DGB,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """``GW1, GW2, GS1, GS2`` hold the final state's gradients (the host copies them there) and are
    updated in place, chunk by chunk from the last, into the initial state's gradients."""
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    for si in range(0, nseg):
        seg = nseg - 1 - si
        n_in = tl.minimum(R, NC - seg * R)
        # Recompute the segment's chunk-start states from its checkpoint.
        _copy_states(CKW1, CKW2, CKS1, CKS2, bh * nseg + seg, SCW1, SCW2, SCS1, SCS2, bh * R, MOMENTUM, D, DH, BD, BHB)
        tl.debug_barrier()
        for r in range(0, n_in - 1):
            ci = seg * R + r
            _mlp_chunk_fwd(
                Q, K, V, CT, GA, GD, GW, GS, GB, Q, SCW1, SCW2, SCS1, SCS2, bh * R + r, SCW1, SCW2, SCS1, SCS2,
                bh * R + r + 1, bh * T, bh * NC + ci, ci * BC, T, p, delta, eps, D, DH, BD, BHB, BC, MOMENTUM, BIAS,
                MM, PREC, False,
            )
        for rr in range(0, n_in):
            r = n_in - 1 - rr
            ci = seg * R + r
            _mlp_chunk_bwd(
                Q, K, V, CT, GA, GD, GW, GS, GB, DY, DQ, DK_, DV_, DCT, DGA, DGD, DGW, DGS, DGB,
                SCW1, SCW2, SCS1, SCS2, bh * R + r, GW1, GW2, GS1, GS2, bh, bh * T, bh * NC + ci, ci * BC, T,
                p, delta, eps, D, DH, BD, BHB, BC, MOMENTUM, BIAS, MM, PREC,
            )
