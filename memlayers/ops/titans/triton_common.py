"""Triton pieces shared by the Titans kernels: tile and vector loads and stores, memory states,
attentional biases.

Imported only through ``memlayers.ops.titans.triton`` (lazily), never at ``import memlayers``.
All math is fp32.
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
def _vec_ptrs(P, base, t0, T, BC: tl.constexpr):
    """Pointers and mask of tokens ``t0 .. t0+BC`` (of ``T``) of a per-token vector whose token 0 is ``base``."""
    rc = tl.arange(0, BC)
    return P + base + t0 + rc, (t0 + rc) < T


@triton.jit
def _load_vec(P, base, t0, T, BC: tl.constexpr):
    ptrs, m = _vec_ptrs(P, base, t0, T, BC)
    return tl.load(ptrs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def _store_vec(P, x, base, t0, T, BC: tl.constexpr, ADD: tl.constexpr):
    """Store ``x [C]`` (``ADD``: atomically add it to an fp32 vector, for partial sums over programs)."""
    ptrs, m = _vec_ptrs(P, base, t0, T, BC)
    if ADD:
        tl.atomic_add(ptrs, x, mask=m)
    else:
        tl.store(ptrs, x, mask=m)


@triton.jit
def _load_last(P, base, t0, T, BC: tl.constexpr):
    """The entry of a per-token vector at the chunk's last valid token (a scalar)."""
    return tl.load(P + base + t0 + tl.minimum(T - t0, BC) - 1)


@triton.jit
def _is_last(t0, T, BC: tl.constexpr):
    """``[C]`` mask of the chunk's last valid token."""
    return tl.arange(0, BC) == (tl.minimum(T - t0, BC) - 1)


@triton.jit
def _cc_ptrs(P, cidx, BC: tl.constexpr):
    """Pointers to chunk ``cidx``'s ``[C, C]`` matrix in a stack of them."""
    rc = tl.arange(0, BC)
    return P + cidx * (BC * BC) + rc[:, None] * BC + rc[None, :]


@triton.jit
def _load_cc(P, cidx, BC: tl.constexpr):
    return tl.load(_cc_ptrs(P, cidx, BC))


@triton.jit
def _store_cc(P, x, cidx, BC: tl.constexpr, ADD: tl.constexpr):
    if ADD:
        tl.atomic_add(_cc_ptrs(P, cidx, BC), x)
    else:
        tl.store(_cc_ptrs(P, cidx, BC), x)
