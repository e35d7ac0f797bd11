"""Triton kernels of the deep Titans memory: the residual MLP ``M(x) = x + silu(x W1) W2`` per head.

Same schedule as ``triton_linear.py`` (one program per (batch, head), states in fp32 registers,
checkpoints every ``R`` chunks, segment-wise recomputation in the backward). A chunk, with the
keys' activations at the chunk-start weights ``Z = K W1``, ``Hk = silu(Z)``:

    E = g(K + Hk W2 - V)                         # layer-2 per-token gradients: Hk_j^T e_j
    U = (E W2^T) * silu'(Z)                      # layer-1 per-token gradients: k_j^T u_j
    Zq = A (Q W1) + d (Q S1) - ((Q K^T) * c * theta) U          # queries through token-level W1_i
    Y  = Q + A (Hq W2) + d (Hq S2) - ((Hq Hk^T) * c * theta) E  # Hq = silu(Zq), token-level W2_i

so retrieval with every token's own weights is exact without materializing them.
"""
import triton
import triton.language as tl

from .triton_common import (
    _load_chunk_bwd_rows, _load_rows, _load_state, _store_chunk_grads, _store_rows, _store_state,
    bias_grad, bias_hess, chunk_gates, gates_bwd, mm, pick, pick_row,
)


@triton.jit
def _silu_parts(z):
    """silu(z) and its first derivative."""
    s = tl.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s)), s


@triton.jit
def _load_states(PW1, PW2, PS1, PS2, idx, MOMENTUM: tl.constexpr, D: tl.constexpr, DH: tl.constexpr,
                 BD: tl.constexpr, BHD: tl.constexpr):
    """Both layers' states ``(W1 [D, DH], W2 [DH, D], S1, S2)``, matrix ``idx`` of each stack."""
    W1, S1 = _load_state(PW1, PS1, idx, 0, MOMENTUM, D, DH, BD, BHD)
    W2, S2 = _load_state(PW2, PS2, idx, 0, MOMENTUM, DH, D, BHD, BD)
    return W1, W2, S1, S2


@triton.jit
def _store_states(PW1, PW2, PS1, PS2, idx, W1, W2, S1, S2, MOMENTUM: tl.constexpr, D: tl.constexpr,
                  DH: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr):
    """Store both layers' states as matrix ``idx`` of each stack (momentum only with ``MOMENTUM``)."""
    _store_state(PW1, PS1, idx, 0, W1, S1, MOMENTUM, D, DH, BD, BHD)
    _store_state(PW2, PS2, idx, 0, W2, S2, MOMENTUM, DH, D, BHD, BD)


@triton.jit
def _mlp_chunk_fwd(
    Q, K, V, TH, AL, ET, Y, W1, W2, S1, S2, tbase, t0, T, p, delta, eps,
    D: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, WRITE_Y: tl.constexpr,
):
    th, la, lb, LA, LB, c, d, A, Bv, is_last = chunk_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    k = _load_rows(K, tbase, t0, T, 0, D, BD, BC)
    v = _load_rows(V, tbase, t0, T, 0, D, BD, BC)
    z = mm(k, W1, MM, PREC)
    hk, dsilu, _s = _silu_parts(z)
    e = bias_grad(k + mm(hk, W2, MM, PREC) - v, BIAS, p, delta, eps)
    u = mm(e, tl.trans(W2), MM, PREC) * dsilu
    if WRITE_Y:
        q = _load_rows(Q, tbase, t0, T, 0, D, BD, BC)
        ct = c * th[None, :]
        qk = mm(q, tl.trans(k), MM, PREC)
        zq = A[:, None] * mm(q, W1, MM, PREC) - mm(qk * ct, u, MM, PREC)
        if MOMENTUM:
            zq += d[:, None] * mm(q, S1, MM, PREC)
        hq = zq * tl.sigmoid(zq)
        hh = mm(hq, tl.trans(hk), MM, PREC)
        y = q + A[:, None] * mm(hq, W2, MM, PREC) - mm(hh * ct, e, MM, PREC)
        if MOMENTUM:
            y += d[:, None] * mm(hq, S2, MM, PREC)
        _store_rows(Y, y, tbase, t0, T, 0, D, BD, BC)
    w_end = pick_row(c, is_last) * th
    a_last = pick(A, is_last)
    W1n = a_last * W1 - mm(tl.trans(k), w_end[:, None] * u, MM, PREC)
    W2n = a_last * W2 - mm(tl.trans(hk), w_end[:, None] * e, MM, PREC)
    if MOMENTUM:
        d_last = pick(d, is_last)
        W1n += d_last * S1
        W2n += d_last * S2
        lb_last = pick(lb, is_last)
        s_end = tl.exp(lb_last - lb) * th
        b_last = tl.exp(lb_last)
        S1 = b_last * S1 - mm(tl.trans(k), s_end[:, None] * u, MM, PREC)
        S2 = b_last * S2 - mm(tl.trans(hk), s_end[:, None] * e, MM, PREC)
    return W1n, W2n, S1, S2


@triton.jit
def titans_mlp_fwd_kernel(
    Q, K, V, TH, AL, ET, W10, W20, S10, S20, Y, W1T, W2T, S1T, S2T, CKW1, CKW2, CKS1, CKS2,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    W1, W2, S1, S2 = _load_states(W10, W20, S10, S20, bh, MOMENTUM, D, DH, BD, BHD)
    for ci in range(0, NC):
        if ci % R == 0:
            _store_states(CKW1, CKW2, CKS1, CKS2, bh * nseg + ci // R, W1, W2, S1, S2, MOMENTUM, D, DH, BD, BHD)
        W1, W2, S1, S2 = _mlp_chunk_fwd(
            Q, K, V, TH, AL, ET, Y, W1, W2, S1, S2, bh * T, ci * BC, T, p, delta, eps,
            D, BD, BHD, BC, MOMENTUM, FORGET, BIAS, MM, PREC, True,
        )
    _store_states(W1T, W2T, S1T, S2T, bh, W1, W2, S1, S2, MOMENTUM, D, DH, BD, BHD)


@triton.jit
def _mlp_chunk_bwd(
    Q, K, V, TH, AL, ET, DY, DQ, DK_, DV_, DTH, DAL, DET,
    W1, W2, S1, S2, dW1n, dW2n, dS1n, dS2n, tbase, t0, T, p, delta, eps,
    D: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """Gradients of one chunk from its start state and its end state's gradients (see the linear one)."""
    th, la, lb, LA, LB, c, d, A, Bv, is_last = chunk_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    q, k, v, dy = _load_chunk_bwd_rows(Q, K, V, DY, tbase, t0, T, D, D, BD, BD, BC)
    # Recompute the chunk's forward.
    z = mm(k, W1, MM, PREC)
    hk, dsilu, sg = _silu_parts(z)
    r = k + mm(hk, W2, MM, PREC) - v
    e = bias_grad(r, BIAS, p, delta, eps)
    ew = mm(e, tl.trans(W2), MM, PREC)
    u = ew * dsilu
    ct = c * th[None, :]
    qk = mm(q, tl.trans(k), MM, PREC)
    qw1 = mm(q, W1, MM, PREC)
    zq = A[:, None] * qw1 - mm(qk * ct, u, MM, PREC)
    if MOMENTUM:
        qs1 = mm(q, S1, MM, PREC)
        zq += d[:, None] * qs1
    hq, dsilu_q, _sq = _silu_parts(zq)
    hh = mm(hq, tl.trans(hk), MM, PREC)
    w_end = pick_row(c, is_last) * th
    a_last = pick(A, is_last)
    # Y = Q + A (Hq W2) + d (Hq S2) - (hh * ct) E
    dq = dy
    p2 = mm(dy, tl.trans(e), MM, PREC)
    dct = -(hh * p2)
    dhq = A[:, None] * mm(dy, tl.trans(W2), MM, PREC) - mm(p2 * ct, hk, MM, PREC)
    if MOMENTUM:
        dhq += d[:, None] * mm(dy, tl.trans(S2), MM, PREC)
    dhk = -mm(tl.trans(p2 * ct), hq, MM, PREC)
    de = -mm(tl.trans(hh * ct), dy, MM, PREC)
    dW2 = mm(tl.trans(hq), A[:, None] * dy, MM, PREC) + a_last * dW2n
    dA = tl.sum(mm(hq, W2, MM, PREC) * dy, 1)
    # Zq = A (Q W1) + d (Q S1) - (qk * ct) U
    dzq = dhq * dsilu_q
    dq += A[:, None] * mm(dzq, tl.trans(W1), MM, PREC)
    p1 = mm(dzq, tl.trans(u), MM, PREC)
    dct -= qk * p1
    dq -= mm(p1 * ct, k, MM, PREC)
    dk = -mm(tl.trans(p1 * ct), q, MM, PREC)
    du = -mm(tl.trans(qk * ct), dzq, MM, PREC)
    dW1 = mm(tl.trans(q), A[:, None] * dzq, MM, PREC) + a_last * dW1n
    dA += tl.sum(qw1 * dzq, 1)
    # End states: W1' = a W1 + d S1 - K^T (w_end U), W2' = a W2 + d S2 - Hk^T (w_end E).
    kdw1 = mm(k, dW1n, MM, PREC)
    hdw2 = mm(hk, dW2n, MM, PREC)
    du -= w_end[:, None] * kdw1
    dk -= w_end[:, None] * mm(u, tl.trans(dW1n), MM, PREC)
    de -= w_end[:, None] * hdw2
    dhk -= w_end[:, None] * mm(e, tl.trans(dW2n), MM, PREC)
    dw_end = -(tl.sum(kdw1 * u, 1) + tl.sum(hdw2 * e, 1))
    dA += tl.where(is_last, tl.sum(tl.sum(W1 * dW1n, 1), 0) + tl.sum(tl.sum(W2 * dW2n, 1), 0), 0.0)
    if MOMENTUM:
        dq += d[:, None] * mm(dzq, tl.trans(S1), MM, PREC)
        dd = tl.sum(mm(hq, S2, MM, PREC) * dy, 1) + tl.sum(qs1 * dzq, 1)
        d_last = pick(d, is_last)
        lb_last = pick(lb, is_last)
        b_last = tl.exp(lb_last)
        s_end = tl.exp(lb_last - lb) * th
        kds1 = mm(k, dS1n, MM, PREC)
        hds2 = mm(hk, dS2n, MM, PREC)
        du -= s_end[:, None] * kds1
        dk -= s_end[:, None] * mm(u, tl.trans(dS1n), MM, PREC)
        de -= s_end[:, None] * hds2
        dhk -= s_end[:, None] * mm(e, tl.trans(dS2n), MM, PREC)
        ds_end = -(tl.sum(kds1 * u, 1) + tl.sum(hds2 * e, 1))
        dd += tl.where(is_last, tl.sum(tl.sum(S1 * dW1n, 1), 0) + tl.sum(tl.sum(S2 * dW2n, 1), 0), 0.0)
        db_end = tl.sum(tl.sum(S1 * dS1n, 1), 0) + tl.sum(tl.sum(S2 * dS2n, 1), 0)
        dS1 = mm(tl.trans(q), d[:, None] * dzq, MM, PREC) + d_last * dW1n + b_last * dS1n
        dS2 = mm(tl.trans(hq), d[:, None] * dy, MM, PREC) + d_last * dW2n + b_last * dS2n
    else:
        dd = tl.zeros([BC], dtype=tl.float32)
        ds_end = tl.zeros([BC], dtype=tl.float32)
        db_end = 0.0
        dS1 = dS1n
        dS2 = dS2n
    # U = (E W2^T) * silu'(Z)
    dew = du * dsilu
    de += mm(dew, W2, MM, PREC)
    dW2 += mm(tl.trans(dew), e, MM, PREC)
    dz = du * ew * (sg * (1.0 - sg) * (2.0 + z * (1.0 - 2.0 * sg)))
    # E = g(K + Hk W2 - V)
    dr = de * bias_hess(r, BIAS, p, delta, eps)
    dk += dr
    dhk += mm(dr, tl.trans(W2), MM, PREC)
    dW2 += mm(tl.trans(hk), dr, MM, PREC)
    # Hk = silu(K W1)
    dz += dhk * dsilu
    dk += mm(dz, tl.trans(W1), MM, PREC)
    dW1 += mm(tl.trans(k), dz, MM, PREC)
    _store_chunk_grads(DQ, DK_, DV_, dq, dk, -dr, tbase, t0, T, D, D, BD, BD, BC)
    gates_bwd(
        dct, dw_end, ds_end, dA, dd, db_end, th, la, lb, LA, LB, c, Bv, is_last,
        AL, ET, DTH, DAL, DET, tbase, tbase, t0, T, BC, MOMENTUM, FORGET,
    )
    return dW1, dW2, dS1, dS2


@triton.jit
def titans_mlp_bwd_kernel(
    Q, K, V, TH, AL, ET, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2, DY, DW1T, DW2T, DS1T, DS2T,
    DQ, DK_, DV_, DTH, DAL, DET, DW10, DW20, DS10, DS20,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr, BHD: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, FORGET: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    dW1, dW2, dS1, dS2 = _load_states(DW1T, DW2T, DS1T, DS2T, bh, MOMENTUM, D, DH, BD, BHD)
    for si in range(0, nseg):
        seg = nseg - 1 - si
        n_in = tl.minimum(R, NC - seg * R)
        W1, W2, S1, S2 = _load_states(CKW1, CKW2, CKS1, CKS2, bh * nseg + seg, MOMENTUM, D, DH, BD, BHD)
        for r in range(0, n_in):
            _store_states(SCW1, SCW2, SCS1, SCS2, bh * R + r, W1, W2, S1, S2, MOMENTUM, BD, BHD, BD, BHD)
            if r < n_in - 1:
                W1, W2, S1, S2 = _mlp_chunk_fwd(
                    Q, K, V, TH, AL, ET, Q, W1, W2, S1, S2, bh * T, (seg * R + r) * BC, T, p, delta, eps,
                    D, BD, BHD, BC, MOMENTUM, FORGET, BIAS, MM, PREC, False,
                )
        tl.debug_barrier()
        for rr in range(0, n_in):
            r = n_in - 1 - rr
            W1, W2, S1, S2 = _load_states(SCW1, SCW2, SCS1, SCS2, bh * R + r, MOMENTUM, BD, BHD, BD, BHD)
            dW1, dW2, dS1, dS2 = _mlp_chunk_bwd(
                Q, K, V, TH, AL, ET, DY, DQ, DK_, DV_, DTH, DAL, DET,
                W1, W2, S1, S2, dW1, dW2, dS1, dS2, bh * T, (seg * R + r) * BC, T, p, delta, eps,
                D, BD, BHD, BC, MOMENTUM, FORGET, BIAS, MM, PREC,
            )
        tl.debug_barrier()
    _store_states(DW10, DW20, DS10, DS20, bh, dW1, dW2, dS1, dS2, MOMENTUM, D, DH, BD, BHD)
