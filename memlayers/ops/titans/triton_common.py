"""Triton pieces shared by the linear and the MLP Titans kernels: tile loads and stores, memory
states, gates of a chunk, attentional biases.

Imported only through ``memlayers.ops.titans.triton`` (lazily), never at ``import memlayers``.
All math is fp32; gate matmuls are split-tf32 (fp32-level accuracy on tensor cores: they set every
decay coefficient, whatever the inputs' dtype).
"""
import triton
import triton.language as tl

# Bias ids (constexpr in the kernels), in the order of naive.BIASES.
BIAS_IDS = {"l2": 0, "lp": 1, "huber": 2}


@triton.jit
def mm(a, b, MM: tl.constexpr, PREC: tl.constexpr):
    """``a @ b`` with both operands cast to ``MM`` and fp32 accumulation.

    ``MM`` is the inputs' dtype for fp16/bf16 (half the shared memory of fp32 operands, full-rate
    tensor cores) and fp32 for fp32 inputs, where ``PREC`` ("tf32x3" or, when allowed, "tf32")
    keeps the dots on tensor cores: "ieee" fp32 dots run on FMA units with register-hungry layouts.
    """
    return tl.dot(a.to(MM), b.to(MM), input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def gate_mm(a, b):
    """``a @ b`` of fp32 gate matrices at fp32-level accuracy: three tf32 products of the operands
    split into a tf32 head and an fp32 tail (~21 mantissa bits). Written out rather than
    ``input_precision="tf32x3"``, which for one 64x64x64 product measured 255 registers and spills
    on sm_90 (4 warps; this form: 242, none; "ieee": 9 KB of local memory)."""
    a_hi = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    b_hi = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    c = tl.dot(a_hi, b_hi, input_precision="tf32")
    c += tl.dot(a - a_hi, b_hi, input_precision="tf32")
    return c + tl.dot(a_hi, b - b_hi, input_precision="tf32")


@triton.jit
def _row_block(P, base, t0, T, c0, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    """Pointers and mask of rows ``t0 .. t0+BC`` (of ``T``), columns ``c0 .. c0+BD`` (of ``D``) of a
    row-major ``[*, D]`` matrix whose row 0 is row ``base`` of ``P``."""
    rc = tl.arange(0, BC)
    rd = c0 + tl.arange(0, BD)
    m = ((t0 + rc) < T)[:, None] & (rd < D)[None, :]
    return P + (base + t0 + rc)[:, None] * D + rd[None, :], m


@triton.jit
def _load_rows(P, base, t0, T, c0, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    return _load_rows_raw(P, base, t0, T, c0, D, BD, BC).to(tl.float32)


@triton.jit
def _load_rows_raw(P, base, t0, T, c0, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    """Rows in their stored dtype: dot operands are cast to the matmul dtype, never through fp32."""
    ptrs, m = _row_block(P, base, t0, T, c0, D, BD, BC)
    return tl.load(ptrs, mask=m, other=0.0)


@triton.jit
def _store_rows(P, x, base, t0, T, c0, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    ptrs, m = _row_block(P, base, t0, T, c0, D, BD, BC)
    tl.store(ptrs, x.to(P.dtype.element_ty), mask=m)


@triton.jit
def _add_rows(P, x, base, t0, T, c0, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    """Atomically add ``x`` to the rows of ``P`` (fp32) that ``_store_rows`` would write."""
    ptrs, m = _row_block(P, base, t0, T, c0, D, BD, BC)
    tl.atomic_add(ptrs, x, mask=m)


@triton.jit
def _mat_ptrs(P, idx, r0, c0, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BCOL: tl.constexpr):
    """Pointers and mask of the block at row ``r0``, column ``c0`` of matrix ``idx`` in a stack of
    ``[R, C]`` row-major matrices."""
    rr = r0 + tl.arange(0, BR)
    cc = c0 + tl.arange(0, BCOL)
    return P + idx * (R * C) + rr[:, None] * C + cc[None, :], (rr < R)[:, None] & (cc < C)[None, :]


@triton.jit
def _load_mat(P, idx, r0, c0, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BCOL: tl.constexpr):
    ptrs, m = _mat_ptrs(P, idx, r0, c0, R, C, BR, BCOL)
    return tl.load(ptrs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_mat(P, idx, r0, c0, x, R: tl.constexpr, C: tl.constexpr, BR: tl.constexpr, BCOL: tl.constexpr):
    ptrs, m = _mat_ptrs(P, idx, r0, c0, R, C, BR, BCOL)
    tl.store(ptrs, x, mask=m)


@triton.jit
def _load_state(PW, PS, idx, r0, c0, MOMENTUM: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                BR: tl.constexpr, BCOL: tl.constexpr):
    """One layer's state block ``(W, S)`` at ``(r0, c0)`` of matrix ``idx`` of ``PW``, ``PS``
    (``S`` is 0 without momentum)."""
    W = _load_mat(PW, idx, r0, c0, R, C, BR, BCOL)
    if MOMENTUM:
        S = _load_mat(PS, idx, r0, c0, R, C, BR, BCOL)
    else:
        S = tl.zeros([BR, BCOL], dtype=tl.float32)
    return W, S


@triton.jit
def _store_state(PW, PS, idx, r0, c0, W, S, MOMENTUM: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
                 BR: tl.constexpr, BCOL: tl.constexpr):
    """Store one layer's state block ``(W, S)`` at ``(r0, c0)`` of matrix ``idx`` of ``PW``, ``PS``
    (``S`` only with momentum)."""
    _store_mat(PW, idx, r0, c0, W, R, C, BR, BCOL)
    if MOMENTUM:
        _store_mat(PS, idx, r0, c0, S, R, C, BR, BCOL)


@triton.jit
def bias_grad(r, BIAS: tl.constexpr, p, delta, eps):
    """d loss / d r, elementwise (see naive.bias_grad)."""
    if BIAS == 0:
        g = 2.0 * r
    elif BIAS == 1:
        g = p * r * tl.exp((0.5 * p - 1.0) * tl.log(r * r + eps))
    else:
        g = 2.0 * tl.minimum(tl.maximum(r, -delta), delta)
    return g


@triton.jit
def bias_hess(r, BIAS: tl.constexpr, p, delta, eps):
    """d bias_grad / d r, elementwise: the backward differentiates through the inner gradient."""
    if BIAS == 0:
        h = tl.zeros_like(r) + 2.0
    elif BIAS == 1:
        u = r * r + eps
        h = p * tl.exp((0.5 * p - 2.0) * tl.log(u)) * ((p - 1.0) * r * r + eps)
    else:
        h = tl.where(tl.abs(r) <= delta, 2.0, 0.0)
    return h


@triton.jit
def chunk_gates(TH, AL, ET, gbase, t0, T, BC: tl.constexpr, MOMENTUM: tl.constexpr, FORGET: tl.constexpr):
    """Decay/momentum coefficients of the chunk starting at token ``t0`` (see naive.py).

    Returns ``th [C]``, ``la [C]`` and ``lb [C]`` (log cumulative gates), ``LA, LB [C, C]``,
    ``c [C, C]``, ``d [C]``, ``A [C]``, ``Bv [C]``, ``is_last [C]`` (the chunk's last valid token).
    Padded tokens past ``T`` get theta 0 and gates 1, so they change nothing.
    """
    rc = tl.arange(0, BC)
    tm = (t0 + rc) < T
    th = tl.load(TH + gbase + t0 + rc, mask=tm, other=0.0).to(tl.float32)
    causal = rc[:, None] >= rc[None, :]
    if FORGET:
        keep = 1.0 - tl.load(AL + gbase + t0 + rc, mask=tm, other=0.0).to(tl.float32)
        la = tl.cumsum(tl.log(tl.maximum(keep, 1e-30)), 0)
    else:
        la = tl.zeros([BC], dtype=tl.float32)
    LA = tl.exp(tl.where(causal, la[:, None] - la[None, :], float("-inf")))
    A = tl.exp(la)
    is_last = rc == (tl.minimum(T - t0, BC) - 1)
    if MOMENTUM:
        et = tl.load(ET + gbase + t0 + rc, mask=tm, other=1.0).to(tl.float32)
        lb = tl.cumsum(tl.log(tl.maximum(et, 1e-30)), 0)
        LB = tl.exp(tl.where(causal, lb[:, None] - lb[None, :], float("-inf")))
        c = gate_mm(LA, LB)
        Bv = tl.exp(lb)
        d = tl.sum(LA * Bv[None, :], 1)
    else:
        lb = tl.zeros([BC], dtype=tl.float32)
        LB = LA
        c = LA
        Bv = tl.zeros([BC], dtype=tl.float32)
        d = tl.zeros([BC], dtype=tl.float32)
    return th, la, lb, LA, LB, c, d, A, Bv, is_last


@triton.jit
def pick(x, is_last):
    """The entry of ``x [C]`` at the chunk's last valid token (a scalar)."""
    return tl.sum(tl.where(is_last, x, 0.0), 0)


@triton.jit
def pick_row(m, is_last):
    """Row of ``m [C, C]`` at the chunk's last valid token (a ``[C]`` vector over columns)."""
    return tl.sum(tl.where(is_last[:, None], m, 0.0), 0)


@triton.jit
def gate_grad(G, dP, L, lcum, gate, BC: tl.constexpr):
    """``d f / d gate [C]`` for ``f = sum_ij G_ij L_ij + sum_i dP_i P_i``, never dividing by a gate.

    ``L_ij = prod_{j<m<=i} gate_m`` and ``P_i = prod_{m<=i} gate_m`` are held as ``exp`` of the log
    cumsum ``lcum``. The derivative by ``gate_l`` is the product with ``gate_l`` left out,
    ``L_il * prod_{j<m<l} gate_m``; both factors exclude ``gate_l``, so a gate of exactly 0 (full
    forgetting, no momentum) gets its exact gradient, where dividing ``d f / d lcum`` by the gate
    could not (0/0 at the end of the range, 1/gate error growth near it).
    """
    rc = tl.arange(0, BC)
    lex = lcum - tl.log(tl.maximum(gate, 1e-30))  # log prod_{m<l} gate_m
    before = tl.exp(tl.where(rc[:, None] > rc[None, :], lex[:, None] - lcum[None, :], float("-inf")))
    X = gate_mm(G, tl.trans(before)) + dP[:, None] * tl.exp(lex)[None, :]
    return tl.sum(L * X, 0)


@triton.jit
def gates_bwd(
    dct, dw_end, ds_end, dA, dd, db_end,
    th, la, lb, LA, LB, c, Bv, is_last,
    AL, ET, DTH, DAL, DET, gbase, obase, t0, T, BC: tl.constexpr, MOMENTUM: tl.constexpr, FORGET: tl.constexpr,
):
    """Back-propagate to theta, alpha, eta and store their gradients for this chunk.

    Gates are read at ``gbase + t0``, gradients written at ``obase + t0`` (a partial-sum buffer's row).

    Inputs are the gradients of the chunk's uses of the gates: ``dct [C, C]`` of ``c * theta``
    (masked matmul weights), ``dw_end [C]`` of ``c[last] * theta`` (state update), ``ds_end [C]`` of
    ``(B_last / B_j) * theta_j`` (momentum update), ``dA [C]``, ``dd [C]``, ``db_end`` of ``B_last``.
    The gate gradients are linear in these inputs, so partial inputs give partial gradients.
    """
    rc = tl.arange(0, BC)
    tm = (t0 + rc) < T
    c_last = pick_row(c, is_last)
    dth = tl.sum(dct * c, 0) + c_last * dw_end
    dc = dct * th[None, :] + tl.where(is_last[:, None], (th * dw_end)[None, :], 0.0)
    if MOMENTUM:
        lb_last = pick(lb, is_last)
        sdec = tl.exp(lb_last - lb)
        dth += sdec * ds_end
        # Uses of LB: c = LA LB, s_end = LB[last] * theta; of B: d = LA B, B_last.
        dLB = gate_mm(tl.trans(LA), dc) + tl.where(is_last[:, None], (ds_end * th)[None, :], 0.0)
        dBv = tl.sum(LA * dd[:, None], 0) + tl.where(is_last, db_end, 0.0)
        et = tl.load(ET + gbase + t0 + rc, mask=tm, other=1.0).to(tl.float32)
        tl.store(DET + obase + t0 + rc, gate_grad(dLB, dBv, LB, lb, et, BC), mask=tm)
        dLA = gate_mm(dc, tl.trans(LB)) + dd[:, None] * Bv[None, :]
    else:
        dLA = dc
    if FORGET:
        keep = 1.0 - tl.load(AL + gbase + t0 + rc, mask=tm, other=0.0).to(tl.float32)
        tl.store(DAL + obase + t0 + rc, -gate_grad(dLA, dA, LA, la, keep, BC), mask=tm)
    tl.store(DTH + obase + t0 + rc, dth, mask=tm)
