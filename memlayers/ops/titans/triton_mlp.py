"""Triton kernels of the deep Titans memory: the residual MLP ``M(x) = x + silu(x W1) W2`` per head.

A chunk, with the keys' activations at the chunk-start weights ``Z = K W1``, ``Hk = silu(Z)``:

    E = g(K + Hk W2 - V)                         # layer-2 per-token gradients: Hk_j^T e_j
    U = (E W2^T) * silu'(Z)                      # layer-1 per-token gradients: k_j^T u_j
    Zq = A (Q W1) + d (Q S1) - ((Q K^T) * c * theta) U          # queries through token-level W1_i
    Y  = Q + A (Hq W2) + d (Hq S2) - ((Hq Hk^T) * c * theta) E  # Hq = silu(Zq), token-level W2_i

so retrieval with every token's own weights is exact without materializing them.

Decomposition (why it fits): the hidden activations couple every value column (``E`` needs the
whole sum over the hidden layer), so the state cannot be split over value columns as the linear
memory's is. It is split over the hidden dimension instead: the four state matrices ``W1 [D, Dh]``,
``W2 [Dh, D]``, ``S1``, ``S2`` live in global memory (fp32, L2-resident) and are streamed through
registers in blocks of ``BHB`` hidden units, ``W1[:, h]`` with ``W2[h, :]``. Everything a block
needs from the other blocks is a sum over the hidden dimension (``E``; in the backward the
residuals' gradient), so each chunk is a few passes over the blocks. Products with the chunk's
``[C, D]`` tiles (``K``, ``E``, ``dr``) in the sequential kernels and the whole-head contractions
(``Q K^T``, ``dY E^T``, ``K dW1``) run over head-dim blocks of at most 32 (16 with 16-token chunks),
loaded as needed: whole-head tiles spilled registers at head dim 128 (mma operands live in registers:
sm_80, and sm_90's 16-row dots).

Only the state's chunk-to-chunk recurrence is sequential. The sequence is cut into segments of
``R`` chunks (see ``triton.py``), and per segment:

- forward: ``titans_mlp_fwd_state_kernel`` (one program per batch row and head) carries the state
  through the segment's chunks, storing each chunk-start state and the chunk's residuals
  ``K + Hk W2 - V`` in scratch (and the segment's first state as its checkpoint);
  ``titans_mlp_queries_kernel`` (one program per chunk) stores the keys' and queries' activations,
  ``titans_mlp_fwd_retrieve_kernel`` (one program per chunk) then computes the retrieval ``Y``;
- backward, nine launches: ``titans_mlp_bwd_recompute_kernel`` (the state pass again, from the
  segment's checkpoint); ``titans_mlp_queries_kernel`` again (per chunk: ``Z``, ``U`` and the queries'
  pre-activations ``Zq``); ``titans_mlp_bwd_queries_grad_kernel`` (per chunk: ``dZq``, the gradients
  of ``A`` and ``d``, ``Hq Hk^T``'s shares); ``titans_mlp_bwd_dq_kernel`` (per chunk: dq and the
  gradient of ``c * theta``); ``titans_mlp_bwd_retrieval_kernel`` (per chunk: the retrieval's shares
  of ``dU`` and ``dHk``); ``titans_mlp_bwd_start_share_kernel`` (per chunk: its share of the start
  state's gradients);
  ``titans_mlp_bwd_kernel``, the only sequential part, carries the state gradients through the
  chunks last to first (completing the residuals' gradient ``dr``, hence dv, and each chunk's ``dZ``);
  ``titans_mlp_bwd_dk_kernel`` (per chunk: dk) and ``titans_mlp_bwd_grads_kernel`` (per chunk: the
  gradients of the gates' end weights).

Tiles pass through per-chunk scratch (``[C, Dh]``: ``Z``, ``U``, ``Zq``, ``dZq``, ``dU``, ``dHk`` then
``dZ``; ``[C, D]``: residuals, ``dE``, ``dr``; ``dZq U^T``; state-shaped), so that no kernel holds
another's accumulators (in one kernel per chunk they spilled at head dim 64, sm_90). fp32 accumulation.
"""
import triton
import triton.language as tl

from .triton_common import (
    _is_last, _load_cc, _load_last, _load_mat, _load_rows, _load_rows_raw, _load_state, _load_vec, _store_cc,
    _store_mat, _store_rows, _store_state, _store_vec, bias_grad, bias_hess, mm,
)
from .triton_linear import _segment_chunk


@triton.jit
def mma(acc, a, b, MM: tl.constexpr, PREC: tl.constexpr):
    """``acc + a @ b`` (operands cast to ``MM``) accumulated in place: the row scales of ``a`` are applied
    before the product, so no [C, D] product is held beside its accumulator (they spilled at head dim 128)."""
    return tl.dot(a.to(MM), b.to(MM), acc=acc, input_precision=PREC, out_dtype=tl.float32)


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
def _load_hid(P, sc, h0, DHP: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr):
    """Hidden block ``h0`` of chunk scratch tile ``sc`` (``[C, DHP]``, the hidden size padded to whole blocks)."""
    return _load_mat(P, sc, 0, h0, BC, DHP, BC, BHB)


@triton.jit
def _store_hid(P, sc, h0, x, DHP: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr):
    _store_mat(P, sc, 0, h0, x, BC, DHP, BC, BHB)


@triton.jit
def _load_cd(P, sc, BD: tl.constexpr, BC: tl.constexpr):
    """Chunk scratch tile ``sc`` of ``[C, BD]`` (the head dim padded to its tile)."""
    return _load_mat(P, sc, 0, 0, BC, BD, BC, BD)


@triton.jit
def _store_cd(P, sc, x, BD: tl.constexpr, BC: tl.constexpr):
    _store_mat(P, sc, 0, 0, x, BC, BD, BC, BD)


@triton.jit
def _state_segment(
    K, V, GA, GD, GW, GS, GB, CW1, CW2, CS1, CS2, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2, SRES, SZ, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr, FROM_CKPT: tl.constexpr,
):
    """Segment ``seg``'s chunks in order, one program per (batch, head), with the running state in
    ``CW1, CW2, CS1, CS2`` (updated in place): each chunk's start state into scratch slot ``r`` and its
    residuals ``K + silu(K W1) W2 - V`` into ``SRES``. ``FROM_CKPT`` (the backward's recompute): the
    running state starts from the segment's checkpoint; else (the forward) it continues from the
    previous segment and the segment's first state is stored as its checkpoint."""
    bh = tl.program_id(0)
    nseg = tl.cdiv(NC, R)
    n_in = tl.minimum(R, NC - seg * R)
    tbase = bh * T
    ck = bh * nseg + seg
    if FROM_CKPT:
        _copy_states(CKW1, CKW2, CKS1, CKS2, ck, CW1, CW2, CS1, CS2, bh, MOMENTUM, D, DH, BD, BHB)
        tl.debug_barrier()
    else:
        # The segment's first state as its checkpoint, before the chunks (stored from the chunk loop, it spilled).
        _copy_states(CW1, CW2, CS1, CS2, bh, CKW1, CKW2, CKS1, CKS2, ck, MOMENTUM, D, DH, BD, BHB)
    for r in range(0, n_in):
        ci = seg * R + r
        t0 = ci * BC
        sc = bh * R + r
        # Z = K W1 into scratch (the queries kernel stores the same), then the residuals in head-dim blocks of
        # KR columns: a whole-head [C, D] accumulator beside the streamed W2 blocks spilled (16-token chunks, d128).
        for h0 in range(0, DH, BHB):
            _store_hid(SZ, sc, h0, _keys_w1(K, tbase, t0, T, CW1, bh, h0, D, DH, BD, BHB, BC, MM, PREC), DHP, BHB, BC)
        tl.debug_barrier()
        KR: tl.constexpr = 16 if BC <= 16 else BD
        for c0 in range(0, BD, KR):
            res = _load_rows(K, tbase, t0, T, c0, D, KR, BC) - _load_rows(V, tbase, t0, T, c0, D, KR, BC)
            for h0 in range(0, DH, BHB):
                z = _load_hid(SZ, sc, h0, DHP, BHB, BC)
                res = mma(res, z * tl.sigmoid(z), _load_mat(CW2, bh, h0, c0, DH, D, BHB, KR), MM, PREC)
            _store_mat(SRES, sc, 0, c0, res, BC, BD, BC, KR)
        w_end = _load_vec(GW, tbase, t0, T, BC)
        a_last = _load_last(GA, tbase, t0, T, BC)
        if MOMENTUM:
            d_last = _load_last(GD, tbase, t0, T, BC)
            s_end = _load_vec(GS, tbase, t0, T, BC)
            b_last = _load_last(GB, tbase, t0, T, BC)
        tl.debug_barrier()  # the residuals are stored, every block of the running state read, before the updates
        # Each hidden block: Z (from scratch) and U = (E W2^T) * silu'(Z), then per head-dim block
        # keep the start state and update it: W1' = A_last W1 + d_last S1 - K^T (w_end * U),
        # S1' = B_last S1 - K^T (s_end * U), W2' = A_last W2 + d_last S2 - Hk^T (w_end * E), S2' likewise.
        # Whole-head [C, D] tiles of K and E held through the block spilled at head dim 128.
        KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
        for h0 in range(0, DH, BHB):
            hk, dsilu, _s = _silu_parts(_load_hid(SZ, sc, h0, DHP, BHB, BC))
            u = _e_w2t(SRES, sc, p, delta, eps, CW2, bh, h0, D, DH, BD, BHB, BC, BIAS, MM, PREC) * dsilu
            tl.debug_barrier()  # the block is read whole before its head-dim blocks are overwritten
            for c0 in range(0, BD, KB):
                k = _load_rows_raw(K, tbase, t0, T, c0, D, KB, BC)
                e = bias_grad(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps)
                W1 = _load_mat(CW1, bh, c0, h0, D, DH, KB, BHB)
                W2 = _load_mat(CW2, bh, h0, c0, DH, D, BHB, KB)
                _store_mat(SCW1, sc, c0, h0, W1, D, DH, KB, BHB)
                _store_mat(SCW2, sc, h0, c0, W2, DH, D, BHB, KB)
                W1 = a_last * W1 - mm(tl.trans(k), w_end[:, None] * u, MM, PREC)
                W2 = a_last * W2 - mm(tl.trans(hk), w_end[:, None] * e, MM, PREC)
                if MOMENTUM:
                    S1 = _load_mat(CS1, bh, c0, h0, D, DH, KB, BHB)
                    S2 = _load_mat(CS2, bh, h0, c0, DH, D, BHB, KB)
                    _store_mat(SCS1, sc, c0, h0, S1, D, DH, KB, BHB)
                    _store_mat(SCS2, sc, h0, c0, S2, DH, D, BHB, KB)
                    W1 += d_last * S1
                    W2 += d_last * S2
                    _store_mat(CS1, bh, c0, h0, b_last * S1 - mm(tl.trans(k), s_end[:, None] * u, MM, PREC),
                               D, DH, KB, BHB)
                    _store_mat(CS2, bh, h0, c0, b_last * S2 - mm(tl.trans(hk), s_end[:, None] * e, MM, PREC),
                               DH, D, BHB, KB)
                _store_mat(CW1, bh, c0, h0, W1, D, DH, KB, BHB)
                _store_mat(CW2, bh, h0, c0, W2, DH, D, BHB, KB)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_fwd_state_kernel(
    K, V, GA, GD, GW, GS, GB, CW1, CW2, CS1, CS2, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2, SRES, SZ, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """The forward's state pass over segment ``seg`` (``_state_segment``): ``CW1..`` hold the state
    (the host copies the initial one there) and end as the final state."""
    _state_segment(K, V, GA, GD, GW, GS, GB, CW1, CW2, CS1, CS2, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2,
                   SRES, SZ, seg, T, NC, R, p, delta, eps, D, DH, DHP, BD, BHB, BC, MOMENTUM, BIAS, MM, PREC,
                   False)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_recompute_kernel(
    K, V, GA, GD, GW, GS, GB, CW1, CW2, CS1, CS2, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2, SRES, SZ, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """The backward's recompute of segment ``seg`` from its checkpoint (``_state_segment``), ``CW1..``
    a running-state scratch."""
    _state_segment(K, V, GA, GD, GW, GS, GB, CW1, CW2, CS1, CS2, CKW1, CKW2, CKS1, CKS2, SCW1, SCW2, SCS1, SCS2,
                   SRES, SZ, seg, T, NC, R, p, delta, eps, D, DH, DHP, BD, BHB, BC, MOMENTUM, BIAS, MM, PREC,
                   True)


@triton.jit
def _rows_gram(PA, PB, tbase, t0, T, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, MM: tl.constexpr,
               PREC: tl.constexpr):
    """``A B^T`` ([C, C]) of two row tiles of a head (``Q K^T``), summed over head-dim blocks of at most 32
    loaded as needed: a whole-head contraction held both [C, D] operands in registers and spilled at head
    dim 128 on sm_80 (its mma operands live in registers)."""
    KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for c0 in range(0, BD, KB):
        a = _load_rows_raw(PA, tbase, t0, T, c0, D, KB, BC)
        b = _load_rows_raw(PB, tbase, t0, T, c0, D, KB, BC)
        acc += mm(a, tl.trans(b), MM, PREC)
    return acc


@triton.jit
def _dy_e_gram(DY, tbase, t0, T, SRES, sc, p, delta, eps, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr,
               BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr):
    """``dY E^T`` ([C, C]) in head-dim blocks, as ``_rows_gram``, ``E`` from the residuals in scratch."""
    KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
    acc = tl.zeros([BC, BC], dtype=tl.float32)
    for c0 in range(0, BD, KB):
        dy = _load_rows_raw(DY, tbase, t0, T, c0, D, KB, BC)
        e = bias_grad(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps)
        acc += mm(dy, tl.trans(e), MM, PREC)
    return acc


@triton.jit
def _keys_w1(K, tbase, t0, T, PW1, idx, h0, D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr,
             BHB: tl.constexpr, BC: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr):
    """``K W[:, h]`` ([C, BHB]) for a ``[D, DH]`` matrix ``idx`` of ``PW1`` in head-dim blocks of at most 32
    (see ``_rows_gram``)."""
    KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
    acc = tl.zeros([BC, BHB], dtype=tl.float32)
    for c0 in range(0, BD, KB):
        acc += mm(_load_rows_raw(K, tbase, t0, T, c0, D, KB, BC), _load_mat(PW1, idx, c0, h0, D, DH, KB, BHB), MM, PREC)
    return acc


@triton.jit
def _e_w2t(SRES, sc, p, delta, eps, PW2, idx, h0, D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr,
           BHB: tl.constexpr, BC: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr):
    """``E W[h, :]^T`` ([C, BHB]) for a ``[DH, D]`` matrix ``idx`` of ``PW2``, ``E`` from the residuals in
    scratch, in head-dim blocks (see ``_rows_gram``)."""
    KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
    acc = tl.zeros([BC, BHB], dtype=tl.float32)
    for c0 in range(0, BD, KB):
        e = bias_grad(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps)
        acc += mm(e, tl.trans(_load_mat(PW2, idx, h0, c0, DH, D, BHB, KB)), MM, PREC)
    return acc


@triton.jit
def _rows_w2t(P, tbase, t0, T, PW2, idx, h0, D: tl.constexpr, DH: tl.constexpr, BD: tl.constexpr,
              BHB: tl.constexpr, BC: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr):
    """``X W[h, :]^T`` ([C, BHB]) for a row tile ``X`` of a head (``dY``) and a ``[DH, D]`` matrix ``idx`` of
    ``PW2``, in head-dim blocks (see ``_rows_gram``)."""
    KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
    acc = tl.zeros([BC, BHB], dtype=tl.float32)
    for c0 in range(0, BD, KB):
        x = _load_rows_raw(P, tbase, t0, T, c0, D, KB, BC)
        acc += mm(x, tl.trans(_load_mat(PW2, idx, h0, c0, DH, D, BHB, KB)), MM, PREC)
    return acc


@triton.jit
def _queries_block(q, k, e, qkct, A, d, W1, W2, S1, MOMENTUM: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr):
    """A hidden block's keys' and queries' activations at the chunk-start state: ``(Z, Hk, U, Zq)``."""
    z = mm(k, W1, MM, PREC)
    hk, dsilu, _s = _silu_parts(z)
    u = mm(e, tl.trans(W2), MM, PREC) * dsilu
    zq = A[:, None] * mm(q, W1, MM, PREC) - mm(qkct, u, MM, PREC)
    if MOMENTUM:
        zq += d[:, None] * mm(q, S1, MM, PREC)
    return z, hk, u, zq


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_queries_kernel(
    Q, K, CT, GA, GD, SCW1, SCW2, SCS1, SCS2, SRES, SZ, SU, SZQ, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), from its start state: each hidden block's
    ``Z``, ``U`` and the queries' pre-activations ``Zq`` into scratch (the forward's and the backward's)."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        q = _load_rows_raw(Q, tbase, t0, T, 0, D, BD, BC)
        k = _load_rows_raw(K, tbase, t0, T, 0, D, BD, BC)
        e = bias_grad(_load_cd(SRES, sc, BD, BC), BIAS, p, delta, eps).to(MM)  # only a matmul operand
        qkct = (_rows_gram(Q, K, tbase, t0, T, D, BD, BC, MM, PREC) * _load_cc(CT, bh * NC + ci, BC)).to(MM)
        A = _load_vec(GA, tbase, t0, T, BC)
        d = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            d = _load_vec(GD, tbase, t0, T, BC)
        for h0 in range(0, DH, BHB):
            W1, W2, S1, S2 = _load_block(SCW1, SCW2, SCS1, SCS2, sc, h0, MOMENTUM, D, DH, BD, BHB)
            z, hk, u, zq = _queries_block(q, k, e, qkct, A, d, W1, W2, S1, MOMENTUM, MM, PREC)
            _store_hid(SZ, sc, h0, z, DHP, BHB, BC)
            _store_hid(SU, sc, h0, u, DHP, BHB, BC)
            _store_hid(SZQ, sc, h0, zq, DHP, BHB, BC)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_fwd_retrieve_kernel(
    Q, CT, GA, GD, SCW2, SCS2, SRES, SZ, SZQ, Y, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), after the queries kernel: its retrieval
    ``Y = Q + A (Hq W2) + d (Hq S2) - ((Hq Hk^T) * ct) E`` from the chunk-start state's second layer and
    the activations in scratch (recomputing them here spilled at head dim 128)."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        A = _load_vec(GA, tbase, t0, T, BC)
        d = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            d = _load_vec(GD, tbase, t0, T, BC)
        y = _load_rows(Q, tbase, t0, T, 0, D, BD, BC)
        hh = tl.zeros([BC, BC], dtype=tl.float32)
        for h0 in range(0, DH, BHB):
            hk, _dsilu, _s = _silu_parts(_load_hid(SZ, sc, h0, DHP, BHB, BC))
            hq, _dsilu_q, _sq = _silu_parts(_load_hid(SZQ, sc, h0, DHP, BHB, BC))
            hh += mm(hq, tl.trans(hk), MM, PREC)
            y += A[:, None] * mm(hq, _load_mat(SCW2, sc, h0, 0, DH, D, BHB, BD), MM, PREC)
            if MOMENTUM:
                y += d[:, None] * mm(hq, _load_mat(SCS2, sc, h0, 0, DH, D, BHB, BD), MM, PREC)
        e = bias_grad(_load_cd(SRES, sc, BD, BC), BIAS, p, delta, eps)
        y -= mm(hh * _load_cc(CT, bh * NC + ci, BC), e, MM, PREC)
        _store_rows(Y, y, tbase, t0, T, 0, D, BD, BC)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_queries_grad_kernel(
    Q, DY, CT, GA, GD, SCW1, SCW2, SCS1, SCS2, SRES, SZ, SZQ, SDZQ, SDE, DGA, DGD, DCT, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), after the queries kernel: each hidden
    block's gradient of the queries' pre-activations, ``dZq = (A dY W2^T + d dY S2^T - ((dY E^T) * ct) Hk)
    * silu'(Zq)``, into scratch; the gradients of ``A`` and ``d`` through the retrieval (stored; the
    grads kernel adds the end state's share); ``Hq Hk^T``'s shares of the gradients of ``c * theta``
    (``-(Hq Hk^T) * (dY E^T)``, stored) and of ``E`` (``-((Hq Hk^T) * ct)^T dY``, into ``SDE``): here
    rather than in the queries kernel, where its [C, C] accumulator spilled at head dim 128."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        p2ct = (_dy_e_gram(DY, tbase, t0, T, SRES, sc, p, delta, eps, D, BD, BC, BIAS, MM, PREC)
                * _load_cc(CT, bh * NC + ci, BC)).to(MM)  # only a matmul operand
        A = _load_vec(GA, tbase, t0, T, BC)
        d = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            d = _load_vec(GD, tbase, t0, T, BC)
        dA = tl.zeros([BC], dtype=tl.float32)
        dd = tl.zeros([BC], dtype=tl.float32)
        hh = tl.zeros([BC, BC], dtype=tl.float32)
        for h0 in range(0, DH, BHB):
            hk, _dsilu, _s = _silu_parts(_load_hid(SZ, sc, h0, DHP, BHB, BC))
            hq, dsilu_q, _sq = _silu_parts(_load_hid(SZQ, sc, h0, DHP, BHB, BC))
            hh += mm(hq, tl.trans(hk), MM, PREC)
            dyw2 = _rows_w2t(DY, tbase, t0, T, SCW2, sc, h0, D, DH, BD, BHB, BC, MM, PREC)
            dhq = A[:, None] * dyw2 - mm(p2ct, hk, MM, PREC)
            if MOMENTUM:
                dys2 = _rows_w2t(DY, tbase, t0, T, SCS2, sc, h0, D, DH, BD, BHB, BC, MM, PREC)
                dhq += d[:, None] * dys2
            dzq = dhq * dsilu_q
            _store_hid(SDZQ, sc, h0, dzq, DHP, BHB, BC)
            # Zq = A (Q W1) + d (Q S1) - ..: A's and d's gradients through both layers' reads.
            dA += tl.sum(hq * dyw2, 1) + tl.sum(_keys_w1(Q, tbase, t0, T, SCW1, sc, h0, D, DH, BD, BHB, BC, MM, PREC) * dzq, 1)
            if MOMENTUM:
                dd += tl.sum(hq * dys2, 1) + tl.sum(_keys_w1(Q, tbase, t0, T, SCS1, sc, h0, D, DH, BD, BHB, BC, MM, PREC) * dzq, 1)
        _store_vec(DGA, dA, tbase, t0, T, BC, False)
        if MOMENTUM:
            _store_vec(DGD, dd, tbase, t0, T, BC, False)
        cidx = bh * NC + ci
        # dY E^T again rather than held through the blocks.
        dye = _dy_e_gram(DY, tbase, t0, T, SRES, sc, p, delta, eps, D, BD, BC, BIAS, MM, PREC)
        _store_cc(DCT, -(hh * dye), cidx, BC, False)
        hhct = tl.trans(hh * _load_cc(CT, cidx, BC)).to(MM)
        KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
        for c0 in range(0, BD, KB):  # dY in head-dim blocks: whole [C, D] row tiles spilled (16-token chunks, d128)
            dy = _load_rows_raw(DY, tbase, t0, T, c0, D, KB, BC)
            _store_mat(SDE, sc, 0, c0, -mm(hhct, dy, MM, PREC), BC, BD, BC, KB)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_dq_kernel(
    Q, K, DY, DQ, CT, GA, GD, SCW1, SCS1, SU, SDZQ, SP1, DCT, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), after the queries-grad kernel: dq
    (complete: ``dY + A dZq W1^T + d dZq S1^T - ((dZq U^T) * ct) K``), ``dZq U^T`` for dk (stored)
    and its share of the gradient of ``c * theta`` (``- (Q K^T) * (dZq U^T)``, completing it). A
    launch of its own: in the retrieval kernel, beside its other terms, its [C, D] accumulator spilled at
    head dim 128."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        cidx = bh * NC + ci
        A = _load_vec(GA, tbase, t0, T, BC)
        d = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            d = _load_vec(GD, tbase, t0, T, BC)
        dq = _load_rows(DY, tbase, t0, T, 0, D, BD, BC)
        p1 = tl.zeros([BC, BC], dtype=tl.float32)
        for h0 in range(0, DH, BHB):
            dzq = _load_hid(SDZQ, sc, h0, DHP, BHB, BC)
            p1 += mm(dzq, tl.trans(_load_hid(SU, sc, h0, DHP, BHB, BC)), MM, PREC)
            dq = mma(dq, A[:, None] * dzq, tl.trans(_load_mat(SCW1, sc, 0, h0, D, DH, BD, BHB)), MM, PREC)
            if MOMENTUM:
                dq = mma(dq, d[:, None] * dzq, tl.trans(_load_mat(SCS1, sc, 0, h0, D, DH, BD, BHB)), MM, PREC)
        dq -= mm(p1 * _load_cc(CT, cidx, BC), _load_rows_raw(K, tbase, t0, T, 0, D, BD, BC), MM, PREC)
        _store_rows(DQ, dq, tbase, t0, T, 0, D, BD, BC)
        qk = _rows_gram(Q, K, tbase, t0, T, D, BD, BC, MM, PREC)
        _store_cc(DCT, _load_cc(DCT, cidx, BC) - qk * p1, cidx, BC, False)
        _store_cc(SP1, p1, sc, BC, False)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_retrieval_kernel(
    Q, K, DY, CT, SRES, SZQ, SDZQ, SDU, SDHK, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), after the queries-grad kernel: per hidden
    block the retrieval's share of ``dU`` (``-((Q K^T) * ct)^T dZq``) and of ``dHk`` (``-((dY E^T) * ct)^T Hq``).
    ``dE``'s share through ``dU`` is the sequential kernel's, once ``dU`` is complete."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        ct = _load_cc(CT, bh * NC + ci, BC)
        # [C, C] tiles that only enter matmuls are kept in the matmul dtype (mm casts them anyway).
        qkct = (_rows_gram(Q, K, tbase, t0, T, D, BD, BC, MM, PREC) * ct).to(MM)
        p2ct = (_dy_e_gram(DY, tbase, t0, T, SRES, sc, p, delta, eps, D, BD, BC, BIAS, MM, PREC) * ct).to(MM)
        for h0 in range(0, DH, BHB):
            _store_hid(SDU, sc, h0, -mm(tl.trans(qkct), _load_hid(SDZQ, sc, h0, DHP, BHB, BC), MM, PREC), DHP, BHB, BC)
            zq = _load_hid(SZQ, sc, h0, DHP, BHB, BC)
            _store_hid(SDHK, sc, h0, -mm(tl.trans(p2ct), zq * tl.sigmoid(zq), MM, PREC), DHP, BHB, BC)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_start_share_kernel(
    Q, DY, GA, GD, SZQ, SDZQ, SRW1, SRW2, SRS1, SRS2, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), after the queries-grad kernel: the
    retrieval's share of the chunk-start state's gradients (``SRW1..``: ``Q^T (A dZq)``, ``Hq^T (A dY)``,
    ``Q^T (d dZq)``, ``Hq^T (d dY)``), the first layer's then the second's (one pass holding both ``Q``
    and ``dY`` spilled at head dim 128, sm_80)."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        A = _load_vec(GA, tbase, t0, T, BC)
        d = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            d = _load_vec(GD, tbase, t0, T, BC)
        q = _load_rows_raw(Q, tbase, t0, T, 0, D, BD, BC)
        for h0 in range(0, DH, BHB):
            dzq = _load_hid(SDZQ, sc, h0, DHP, BHB, BC)
            _store_mat(SRW1, sc, 0, h0, mm(tl.trans(q), A[:, None] * dzq, MM, PREC), D, DH, BD, BHB)
            if MOMENTUM:
                _store_mat(SRS1, sc, 0, h0, mm(tl.trans(q), d[:, None] * dzq, MM, PREC), D, DH, BD, BHB)
        dy = _load_rows_raw(DY, tbase, t0, T, 0, D, BD, BC)
        for h0 in range(0, DH, BHB):
            zq = _load_hid(SZQ, sc, h0, DHP, BHB, BC)
            hq = zq * tl.sigmoid(zq)
            # The token weights scale Hq's rows, not dY's (a loop-invariant [C, D] product per weight).
            _store_mat(SRW2, sc, h0, 0, mm(tl.trans(A[:, None] * hq), dy, MM, PREC), DH, D, BHB, BD)
            if MOMENTUM:
                _store_mat(SRS2, sc, h0, 0, mm(tl.trans(d[:, None] * hq), dy, MM, PREC), DH, D, BHB, BD)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_kernel(
    K, DV_, GA, GD, GW, GS, GB, SCW2, SRES, SZ, SDU, SDHK, SDE, SDR, SRW1, SRW2, SRS1, SRS2,
    GW1, GW2, GS1, GS2, SGW1, SGW2, SGS1, SGS2, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """The sequential part: back-propagates the state gradients through segment ``seg``'s chunks, last
    to first, one program per (batch, head). ``GW1, GW2, GS1, GS2`` hold the gradients of the segment's
    end state (the host copies the final state's there before the last segment) and are updated in
    place into those of its start state. Per chunk: pass 1 keeps the chunk-end gradients in scratch
    (``SGW1..``), completes ``dU`` (in ``SDU``) and ``dE``, hence ``dr`` (stored, and ``-dr`` as dv);
    pass 2 each block's ``dZ`` (over ``SDHK``); pass 3 the second layer's start gradients, pass 4 the
    first layer's (passes of their own: together they spilled). The retrieval's shares (``SRW1..``)
    are the retrieval kernel's."""
    bh = tl.program_id(0)
    n_in = tl.minimum(R, NC - seg * R)
    tbase = bh * T
    for rr in range(0, n_in):
        r = n_in - 1 - rr
        ci = seg * R + r
        t0 = ci * BC
        sc = bh * R + r
        w_end = _load_vec(GW, tbase, t0, T, BC)
        s_end = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            s_end = _load_vec(GS, tbase, t0, T, BC)
        # End state W1' = .. - K^T (w_end * U) - K^T (s_end * U), W2' = .. - Hk^T (w_end * E) - Hk^T (s_end * E):
        # their gradients' shares of dU and dE. Pass 1a completes dU, pass 1b then dE. Products with K, E and
        # dr run over head-dim blocks of at most 32 (whole-head [C, D] operands spilled at head dim 128).
        for h0 in range(0, DH, BHB):
            dW1, dW2, dS1, dS2 = _load_block(GW1, GW2, GS1, GS2, bh, h0, MOMENTUM, D, DH, BD, BHB)
            _store_block(SGW1, SGW2, SGS1, SGS2, sc, h0, dW1, dW2, dS1, dS2, MOMENTUM, D, DH, BD, BHB)
            du = -w_end[:, None] * _keys_w1(K, tbase, t0, T, GW1, bh, h0, D, DH, BD, BHB, BC, MM, PREC)
            if MOMENTUM:
                du -= s_end[:, None] * _keys_w1(K, tbase, t0, T, GS1, bh, h0, D, DH, BD, BHB, BC, MM, PREC)
            _store_hid(SDU, sc, h0, _load_hid(SDU, sc, h0, DHP, BHB, BC) + du, DHP, BHB, BC)
        tl.debug_barrier()  # dU is stored before pass 1b reads it (other threads' elements)
        KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
        for c0 in range(0, BD, KB):
            de = _load_mat(SDE, sc, 0, c0, BC, BD, BC, KB)
            for h0 in range(0, DH, BHB):
                hk, dsilu, _s = _silu_parts(_load_hid(SZ, sc, h0, DHP, BHB, BC))
                de = mma(de, -(w_end[:, None] * hk), _load_mat(GW2, bh, h0, c0, DH, D, BHB, KB), MM, PREC)
                if MOMENTUM:
                    de = mma(de, -(s_end[:, None] * hk), _load_mat(GS2, bh, h0, c0, DH, D, BHB, KB), MM, PREC)
                du = _load_hid(SDU, sc, h0, DHP, BHB, BC)
                de = mma(de, du * dsilu, _load_mat(SCW2, sc, h0, c0, DH, D, BHB, KB), MM, PREC)
            dr = de * bias_hess(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps)
            _store_rows(DV_, -dr, tbase, t0, T, c0, D, KB, BC)
            _store_mat(SDR, sc, 0, c0, dr, BC, BD, BC, KB)
        tl.debug_barrier()  # every block of the end state's gradients is read, dr stored, before pass 2
        # The start state's gradients, block by block: W2 = A_last W2' + d_last S2' + (dU * silu'(Z))^T E + Hk^T dr
        # (+ the retrieval's share), S2 = B_last S2' + d_last W2' (+ its share); Z's gradient dZ through U
        # (silu'') and Hk; then W1 = A_last W1' + K^T dZ (+ share), S1 = B_last S1' + d_last W1' (+ share).
        a_last = _load_last(GA, tbase, t0, T, BC)
        d_last = 0.0
        b_last = 0.0
        if MOMENTUM:
            d_last = _load_last(GD, tbase, t0, T, BC)
            b_last = _load_last(GB, tbase, t0, T, BC)
        for h0 in range(0, DH, BHB):
            # dr W2^T, E W2^T, E dW2'^T, E dS2'^T over head-dim blocks.
            drw = tl.zeros([BC, BHB], dtype=tl.float32)
            ew = tl.zeros([BC, BHB], dtype=tl.float32)
            edw = tl.zeros([BC, BHB], dtype=tl.float32)
            eds = tl.zeros([BC, BHB], dtype=tl.float32)
            for c0 in range(0, BD, KB):
                e = bias_grad(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps)
                W2 = _load_mat(SCW2, sc, h0, c0, DH, D, BHB, KB)
                drw += mm(_load_mat(SDR, sc, 0, c0, BC, BD, BC, KB), tl.trans(W2), MM, PREC)
                ew += mm(e, tl.trans(W2), MM, PREC)
                edw += mm(e, tl.trans(_load_mat(SGW2, sc, h0, c0, DH, D, BHB, KB)), MM, PREC)
                if MOMENTUM:
                    eds += mm(e, tl.trans(_load_mat(SGS2, sc, h0, c0, DH, D, BHB, KB)), MM, PREC)
            z = _load_hid(SZ, sc, h0, DHP, BHB, BC)
            hk, dsilu, sg = _silu_parts(z)
            dhk = _load_hid(SDHK, sc, h0, DHP, BHB, BC) + drw - w_end[:, None] * edw - s_end[:, None] * eds
            # U = (E W2^T) * silu'(Z): Z's gradient through silu' (silu'' below) and through Hk.
            du = _load_hid(SDU, sc, h0, DHP, BHB, BC)
            dz = du * ew * (sg * (1.0 - sg) * (2.0 + z * (1.0 - 2.0 * sg))) + dhk * dsilu
            _store_hid(SDHK, sc, h0, dz, DHP, BHB, BC)
            dus = du * dsilu
            for c0 in range(0, BD, KB):
                e = bias_grad(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps)
                dW2 = _load_mat(SGW2, sc, h0, c0, DH, D, BHB, KB)
                gW2 = (_load_mat(SRW2, sc, h0, c0, DH, D, BHB, KB) + a_last * dW2 + mm(tl.trans(dus), e, MM, PREC)
                       + mm(tl.trans(hk), _load_mat(SDR, sc, 0, c0, BC, BD, BC, KB), MM, PREC))
                _store_mat(GW2, bh, h0, c0, gW2, DH, D, BHB, KB)
                if MOMENTUM:
                    gS2 = (_load_mat(SRS2, sc, h0, c0, DH, D, BHB, KB) + d_last * dW2
                           + b_last * _load_mat(SGS2, sc, h0, c0, DH, D, BHB, KB))
                    _store_mat(GS2, bh, h0, c0, gS2, DH, D, BHB, KB)
        tl.debug_barrier()  # dZ is stored before pass 4 reads it (other threads' elements)
        for h0 in range(0, DH, BHB):
            dz = _load_hid(SDHK, sc, h0, DHP, BHB, BC)
            for c0 in range(0, BD, KB):
                dW1 = _load_mat(SGW1, sc, c0, h0, D, DH, KB, BHB)
                k = _load_rows_raw(K, tbase, t0, T, c0, D, KB, BC)
                gW1 = _load_mat(SRW1, sc, c0, h0, D, DH, KB, BHB) + a_last * dW1 + mm(tl.trans(k), dz, MM, PREC)
                _store_mat(GW1, bh, c0, h0, gW1, D, DH, KB, BHB)
                if MOMENTUM:
                    gS1 = (_load_mat(SRS1, sc, c0, h0, D, DH, KB, BHB) + d_last * dW1
                           + b_last * _load_mat(SGS1, sc, c0, h0, D, DH, KB, BHB))
                    _store_mat(GS1, bh, c0, h0, gS1, D, DH, KB, BHB)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_dk_kernel(
    Q, DK_, CT, GW, GS, SCW1, SGW1, SGS1, SU, SDHK, SDR, SP1, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), once the sequential kernel has run: dk
    (``dr``, ``dZ W1^T``, the queries' ``-((dZq U^T) * ct)^T Q`` and the end state's shares). A launch
    apart from the gate gradients' (together they spilled at head dim 128, sm_80)."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        q = _load_rows_raw(Q, tbase, t0, T, 0, D, BD, BC)
        ct = _load_cc(CT, bh * NC + ci, BC)
        dk = _load_cd(SDR, sc, BD, BC) - mm(tl.trans(_load_cc(SP1, sc, BC) * ct), q, MM, PREC)
        w_end = _load_vec(GW, tbase, t0, T, BC)
        s_end = tl.zeros([BC], dtype=tl.float32)
        if MOMENTUM:
            s_end = _load_vec(GS, tbase, t0, T, BC)
        for h0 in range(0, DH, BHB):
            u = _load_hid(SU, sc, h0, DHP, BHB, BC)
            W1 = _load_mat(SCW1, sc, 0, h0, D, DH, BD, BHB)
            dk += mm(_load_hid(SDHK, sc, h0, DHP, BHB, BC), tl.trans(W1), MM, PREC)
            dk -= w_end[:, None] * mm(u, tl.trans(_load_mat(SGW1, sc, 0, h0, D, DH, BD, BHB)), MM, PREC)
            if MOMENTUM:
                dk -= s_end[:, None] * mm(u, tl.trans(_load_mat(SGS1, sc, 0, h0, D, DH, BD, BHB)), MM, PREC)
        _store_rows(DK_, dk, tbase, t0, T, 0, D, BD, BC)


@triton.jit(do_not_specialize=["seg"])
def titans_mlp_bwd_grads_kernel(
    K, SCW1, SCW2, SCS1, SCS2, SGW1, SGW2, SGS1, SGS2, SRES, SZ, SU, DGA, DGD, DGW, DGS, DGB, seg,
    T, NC, R, p, delta, eps,
    D: tl.constexpr, DH: tl.constexpr, DHP: tl.constexpr, BD: tl.constexpr, BHB: tl.constexpr, BC: tl.constexpr,
    MOMENTUM: tl.constexpr, BIAS: tl.constexpr, MM: tl.constexpr, PREC: tl.constexpr,
):
    """One chunk of segment ``seg`` per program (grid axis 2), once the sequential kernel has run: the
    gradients of ``w_end`` and ``s_end``, and the end state's shares of those of ``A``, ``d`` and ``B``
    at the chunk's last token (added to what the queries kernel stored)."""
    bh = tl.program_id(0)
    r, ci, live = _segment_chunk(R, NC, seg)
    if live:
        sc = bh * R + r
        tbase = bh * T
        t0 = ci * BC
        dw_end = tl.zeros([BC], dtype=tl.float32)
        ds_end = tl.zeros([BC], dtype=tl.float32)
        a_dw = 0.0
        s_dw = 0.0
        s_ds = 0.0
        # The token weights' gradients, then the last token's (elementwise over the states): in one pass
        # they spilled at head dim 128, sm_80. The former over head-dim blocks of at most 32 (K and E whole
        # spilled there too), each block's share of the row sums: they are linear in K dW1' and E dW2'^T.
        KB: tl.constexpr = 16 if BC <= 16 else BD // ((BD + 31) // 32)
        for c0 in range(0, BD, KB):
            k = _load_rows_raw(K, tbase, t0, T, c0, D, KB, BC)
            e = bias_grad(_load_mat(SRES, sc, 0, c0, BC, BD, BC, KB), BIAS, p, delta, eps).to(MM)
            for h0 in range(0, DH, BHB):
                hk, _dsilu, _s = _silu_parts(_load_hid(SZ, sc, h0, DHP, BHB, BC))
                u = _load_hid(SU, sc, h0, DHP, BHB, BC)
                kdw = mm(k, _load_mat(SGW1, sc, c0, h0, D, DH, KB, BHB), MM, PREC)
                edw = mm(e, tl.trans(_load_mat(SGW2, sc, h0, c0, DH, D, BHB, KB)), MM, PREC)
                dw_end -= tl.sum(kdw * u, 1) + tl.sum(hk * edw, 1)
                if MOMENTUM:
                    kds = mm(k, _load_mat(SGS1, sc, c0, h0, D, DH, KB, BHB), MM, PREC)
                    eds = mm(e, tl.trans(_load_mat(SGS2, sc, h0, c0, DH, D, BHB, KB)), MM, PREC)
                    ds_end -= tl.sum(kds * u, 1) + tl.sum(hk * eds, 1)
        for h0 in range(0, DH, BHB):
            W1, W2, S1, S2 = _load_block(SCW1, SCW2, SCS1, SCS2, sc, h0, MOMENTUM, D, DH, BD, BHB)
            dW1, dW2, dS1, dS2 = _load_block(SGW1, SGW2, SGS1, SGS2, sc, h0, MOMENTUM, D, DH, BD, BHB)
            a_dw += tl.sum(tl.sum(W1 * dW1, 1), 0) + tl.sum(tl.sum(W2 * dW2, 1), 0)
            if MOMENTUM:
                s_dw += tl.sum(tl.sum(S1 * dW1, 1), 0) + tl.sum(tl.sum(S2 * dW2, 1), 0)
                s_ds += tl.sum(tl.sum(S1 * dS1, 1), 0) + tl.sum(tl.sum(S2 * dS2, 1), 0)
        is_last = _is_last(t0, T, BC)
        _store_vec(DGW, dw_end, tbase, t0, T, BC, False)
        _store_vec(DGA, _load_vec(DGA, tbase, t0, T, BC) + tl.where(is_last, a_dw, 0.0), tbase, t0, T, BC, False)
        if MOMENTUM:
            _store_vec(DGS, ds_end, tbase, t0, T, BC, False)
            _store_vec(DGD, _load_vec(DGD, tbase, t0, T, BC) + tl.where(is_last, s_dw, 0.0), tbase, t0, T, BC, False)
            _store_vec(DGB, tl.where(is_last, s_ds, 0.0), tbase, t0, T, BC, False)
