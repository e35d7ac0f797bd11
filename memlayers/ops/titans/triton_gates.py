"""Triton kernels of the Titans gates: one program per (batch * head, chunk), before and after the
memory kernels.

The gate quantities of a chunk depend on ``theta``, ``alpha`` and ``eta`` alone, never on the memory
state, so they are computed here rather than inside the memory kernels' sequential loop, where
their fp32 ``[C, C]`` products took every register a thread has and spilled (255 registers at
every head dim, sm_90, measured):

- ``titans_gates_fwd_kernel`` writes, per chunk, ``c * theta [C, C]`` and the per-token vectors
  ``A``, ``d``, ``w_end = c[last] * theta``, ``s_end = (B_last / B_j) * theta_j`` and ``B``
  (see naive.py); the memory kernels load them.
- ``titans_gates_bwd_kernel`` turns what the memory backward wrote (the gradients of those same
  quantities: ``dct [C, C]``, ``dA``, ``dd``, ``dw_end``, ``ds_end``, ``dB``) into the gradients of
  ``theta``, ``alpha`` and ``eta``. They are linear in those inputs, so the linear memory's value
  blocks add their shares into one buffer (fp32 atomics) before this kernel runs once.

The decay matrices ``L_ij = prod_{j<m<=i} gate_m`` (``LA`` of ``1 - alpha``, ``LB`` of ``eta``) are
built from the log cumulative gates a row or a column at a time, and every product of them is a
loop of rank-1 fp32 updates over its inner index: no matrix but the accumulators is held, and the
sums are plain fp32 (no tensor-core rounding in the coefficients every output depends on).
"""
import triton
import triton.language as tl

from .triton_common import _is_last, _load_last, _load_vec, _store_cc, _store_vec


@triton.jit
def _entry(x, m):
    """``x[m]`` of a ``[C]`` vector (a scalar)."""
    return tl.sum(tl.where(tl.arange(0, x.shape[0]) == m, x, 0.0), 0)


@triton.jit
def _decay_col(lcum, m):
    """Column ``m`` of the decay matrix of log cumulative gates ``lcum``: ``[i >= m] exp(lcum_i - lcum_m)``."""
    rc = tl.arange(0, lcum.shape[0])
    return tl.exp(tl.where(rc >= m, lcum - _entry(lcum, m), float("-inf")))


@triton.jit
def _decay_row(lcum, m):
    """Row ``m`` of the decay matrix: ``[j <= m] exp(lcum_m - lcum_j)``."""
    rc = tl.arange(0, lcum.shape[0])
    return tl.exp(tl.where(rc <= m, _entry(lcum, m) - lcum, float("-inf")))


@triton.jit
def _decay(lcum):
    """The whole decay matrix ``[C, C]`` (0 above the diagonal)."""
    rc = tl.arange(0, lcum.shape[0])
    return tl.exp(tl.where(rc[:, None] >= rc[None, :], lcum[:, None] - lcum[None, :], float("-inf")))


@triton.jit
def _log_gates(TH, AL, ET, gbase, t0, T, BC: tl.constexpr, MOMENTUM: tl.constexpr, FORGET: tl.constexpr):
    """``theta [C]``, ``1 - alpha``, ``eta`` and their log cumulative products ``la``, ``lb`` (0
    without forgetting / momentum). Padded tokens past ``T`` get theta 0 and gates 1, so they change nothing."""
    rc = tl.arange(0, BC)
    tm = (t0 + rc) < T
    th = tl.load(TH + gbase + t0 + rc, mask=tm, other=0.0).to(tl.float32)
    if FORGET:
        keep = 1.0 - tl.load(AL + gbase + t0 + rc, mask=tm, other=0.0).to(tl.float32)
        la = tl.cumsum(tl.log(tl.maximum(keep, 1e-30)), 0)
    else:
        keep = tl.full([BC], 1.0, tl.float32)
        la = tl.zeros([BC], dtype=tl.float32)
    if MOMENTUM:
        et = tl.load(ET + gbase + t0 + rc, mask=tm, other=1.0).to(tl.float32)
        lb = tl.cumsum(tl.log(tl.maximum(et, 1e-30)), 0)
    else:
        et = tl.zeros([BC], dtype=tl.float32)
        lb = tl.zeros([BC], dtype=tl.float32)
    return th, keep, et, la, lb


@triton.jit
def titans_gates_fwd_kernel(
    TH, AL, ET, CT, GA, GD, GW, GS, GB, T, NC,
    BC: tl.constexpr, MOMENTUM: tl.constexpr, FORGET: tl.constexpr,
):
    bh = tl.program_id(0)
    ci = tl.program_id(1)
    tbase = bh * T
    t0 = ci * BC
    th, keep, et, la, lb = _log_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    is_last = _is_last(t0, T, BC)
    _store_vec(GA, tl.exp(la), tbase, t0, T, BC, False)
    if MOMENTUM:
        # c = LA LB and d = LA B, one rank-1 update per inner index m.
        c = tl.zeros([BC, BC], dtype=tl.float32)
        d = tl.zeros([BC], dtype=tl.float32)
        for m in range(0, BC):
            la_m = _decay_col(la, m)
            c += la_m[:, None] * _decay_row(lb, m)[None, :]
            d += la_m * tl.exp(_entry(lb, m))
        lb_last = tl.sum(tl.where(is_last, lb, 0.0), 0)
        _store_vec(GD, d, tbase, t0, T, BC, False)
        _store_vec(GB, tl.exp(lb), tbase, t0, T, BC, False)
        _store_vec(GS, tl.exp(lb_last - lb) * th, tbase, t0, T, BC, False)
    else:
        c = _decay(la)
    _store_cc(CT, c * th[None, :], bh * NC + ci, BC, False)
    _store_vec(GW, tl.sum(tl.where(is_last[:, None], c, 0.0), 0) * th, tbase, t0, T, BC, False)


@triton.jit
def _gate_grad(G, dP, L, lcum, gate, SCR, BC: tl.constexpr):
    """``d f / d gate [C]`` for ``f = sum_ij G_ij L_ij + sum_i dP_i P_i``, never dividing by a gate.

    ``L_ij = prod_{j<m<=i} gate_m`` and ``P_i = prod_{m<=i} gate_m`` are held as ``exp`` of the log
    cumsum ``lcum``. The derivative by ``gate_l`` is the product with ``gate_l`` left out,
    ``L_il * prod_{j<m<l} gate_m``; both factors exclude ``gate_l``, so a gate of exactly 0 (full
    forgetting, no momentum) gets its exact gradient, where dividing ``d f / d lcum`` by the gate
    could not (0/0 at the end of the range, 1/gate error growth near it).

    ``X = G before^T`` is a loop over ``G``'s columns, read back from ``SCR`` (this program's
    ``[C, C]`` scratch, which ``G`` overwrites).
    """
    rc = tl.arange(0, BC)
    lex = lcum - tl.log(tl.maximum(gate, 1e-30))  # log prod_{m<l} gate_m
    tl.debug_barrier()  # every read of SCR's previous contents is done
    tl.store(SCR + rc[:, None] * BC + rc[None, :], G)
    tl.debug_barrier()
    X = dP[:, None] * tl.exp(lex)[None, :]
    for j in range(0, BC):
        # before_lj = prod_{j<m<l} gate_m for l > j.
        before_j = tl.exp(tl.where(rc > j, lex - _entry(lcum, j), float("-inf")))
        X += tl.load(SCR + rc * BC + j)[:, None] * before_j[None, :]
    return tl.sum(L * X, 0)


@triton.jit
def titans_gates_bwd_kernel(
    TH, AL, ET, DCT, DGA, DGD, DGW, DGS, DGB, DTH, DAL, DET, T, NC,
    BC: tl.constexpr, MOMENTUM: tl.constexpr, FORGET: tl.constexpr,
):
    """Back-propagates ``ct = c * theta`` (``c = LA LB``, ``LA`` without momentum), ``w_end``,
    ``s_end``, ``A``, ``d``, ``B`` to theta, alpha and eta. ``DCT``'s block is this program's scratch
    afterwards."""
    bh = tl.program_id(0)
    ci = tl.program_id(1)
    tbase = bh * T
    t0 = ci * BC
    rc = tl.arange(0, BC)
    tm = (t0 + rc) < T
    scr = DCT + (bh * NC + ci) * (BC * BC)  # this chunk's [C, C] block
    th, keep, et, la, lb = _log_gates(TH, AL, ET, tbase, t0, T, BC, MOMENTUM, FORGET)
    is_last = _is_last(t0, T, BC)
    dA = _load_vec(DGA, tbase, t0, T, BC)
    dw_end = _load_vec(DGW, tbase, t0, T, BC)
    LA = _decay(la)
    la_last = tl.sum(tl.where(is_last[:, None], LA, 0.0), 0)  # row LA[last, :]
    # dc: the gradient of c, from ct = c * theta and w_end = c[last] * theta.
    if MOMENTUM:
        dd = _load_vec(DGD, tbase, t0, T, BC)
        ds_end = _load_vec(DGS, tbase, t0, T, BC)
        db_end = _load_last(DGB, tbase, t0, T, BC)
        # M = LA^T dct (for c = LA LB's uses of LB) and N = (dct * theta) LB^T (of LA), by rows and
        # columns of dct.
        M = tl.zeros([BC, BC], dtype=tl.float32)
        N = tl.zeros([BC, BC], dtype=tl.float32)
        for t in range(0, BC):
            M += _decay_row(la, t)[:, None] * tl.load(scr + t * BC + rc)[None, :]
            N += (tl.load(scr + rc * BC + t) * _entry(th, t))[:, None] * _decay_col(lb, t)[None, :]
        LB = _decay(lb)
        c_last = tl.sum(la_last[:, None] * LB, 0)  # c[last, :] = LA[last, :] LB
        sdec = tl.exp(tl.sum(tl.where(is_last, lb, 0.0), 0) - lb)
        dth = tl.sum(LB * M, 0) + c_last * dw_end + sdec * ds_end
        # c = LA LB, s_end = LB[last] * theta: d LB; d = LA B, B_last: d B.
        thw = th * dw_end
        dLB = M * th[None, :] + la_last[:, None] * thw[None, :] + tl.where(is_last[:, None], (ds_end * th)[None, :], 0.0)
        dBv = tl.sum(LA * dd[:, None], 0) + tl.where(is_last, db_end, 0.0)
        dLA = N + tl.where(is_last[:, None], tl.sum(LB * thw[None, :], 1)[None, :], 0.0) + dd[:, None] * tl.exp(lb)[None, :]
        tl.store(DET + tbase + t0 + rc, _gate_grad(dLB, dBv, LB, lb, et, scr, BC), mask=tm)
    else:
        dct = tl.load(scr + rc[:, None] * BC + rc[None, :])
        dth = tl.sum(dct * LA, 0) + la_last * dw_end
        dLA = dct * th[None, :] + tl.where(is_last[:, None], (th * dw_end)[None, :], 0.0)
    if FORGET:
        tl.store(DAL + tbase + t0 + rc, -_gate_grad(dLA, dA, LA, la, keep, scr, BC), mask=tm)
    tl.store(DTH + tbase + t0 + rc, dth, mask=tm)
