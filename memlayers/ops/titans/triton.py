"""Titans memory on Triton: host functions -> autograd.Function -> public function.

Kernels live in ``triton_linear.py`` (memory matrix per head) and ``triton_mlp.py`` (residual MLP
``x + silu(x W1) W2`` per head); the gate kernels that run before them (the chunks' gate
quantities) and after their backward (the gates' gradients) in ``triton_gates.py``; the helpers
they share in ``triton_common.py``.
Imported lazily by ``memlayers.ops.titans`` (triton reads TRITON_INTERPRET at decoration time).

Fit: the linear memory runs a grid of (batch * head, value blocks), each program holding a
``[Dk, BV]`` block of the state (``value_block``); the MLP memory's sequential kernels one program per
(batch, head) streaming its state through global memory in hidden blocks (``hidden_block``), its
per-chunk kernels one program per chunk. None holds a whole state matrix on chip, so shared memory
stays within an H100/H200 or A100 block at head dims up to 256 and MLP hidden sizes up to 4x that
(compiled and measured by tests/ops/test_titans_fit.py).

Memory use: the forward keeps the memory state every ``R = ceil(sqrt(#chunks))`` chunks, and the
backward one segment of ``R`` states at a time per (batch, head), so per-chunk copies of the
weights are never held for the whole sequence (O(sqrt(T / chunk)) states instead of O(T / chunk)).
The linear memory's backward takes five launches per segment (its recompute, a per-chunk prep, the
sequential state-gradient pass, the per-chunk gradients on the queries' and the keys' side), so that
no kernel holds another's registers: ``5 * ceil(#chunks / R)`` launches, and per program a scratch
of ``5 R`` chunk tiles (``[C, BV]`` and ``[Dk, BV]``) beside the ``R`` recomputed states.
The MLP memory takes three launches per segment in the forward (the sequential state pass, the
per-chunk activations, the per-chunk retrieval) and nine in the backward (see triton_mlp.py), with
per (batch, head) a scratch of ``R`` chunk-start states, one ``[C, D]`` and three ``[C, Dh]`` tiles
per chunk in the forward; in the backward ``3 R``
states (start states, end states' gradients, the retrieval's share of the start states' gradients),
``6 R`` ``[C, Dh]``, ``3 R`` ``[C, D]`` and ``R`` ``[C, C]`` tiles, beside a running state.
The gate quantities take ``T * (C + 5)`` fp32 per (batch, head), for the forward and again for the
backward (recomputed there rather than kept), and the backward's gradients of them as much again.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import BIAS_IDS
from .triton_gates import titans_gates_bwd_kernel, titans_gates_fwd_kernel
from .triton_linear import (
    titans_linear_bwd_grads_kernel, titans_linear_bwd_kernel, titans_linear_bwd_prep_kernel,
    titans_linear_bwd_recompute_kernel, titans_linear_fwd_kernel,
)
from .triton_mlp import (
    titans_mlp_bwd_dk_kernel, titans_mlp_bwd_dq_kernel, titans_mlp_bwd_grads_kernel, titans_mlp_bwd_kernel,
    titans_mlp_bwd_queries_grad_kernel, titans_mlp_bwd_recompute_kernel, titans_mlp_bwd_retrieval_kernel,
    titans_mlp_bwd_start_share_kernel, titans_mlp_fwd_retrieve_kernel, titans_mlp_fwd_state_kernel,
    titans_mlp_queries_kernel,
)


def _block(d: int) -> int:
    # tl.dot needs every tile dimension >= 16.
    return max(16, triton.next_power_of_2(d))


def checkpoint_every(n_chunks: int) -> int:
    """Chunks between stored states: sqrt balances stored checkpoints against the backward's scratch."""
    return max(1, math.ceil(math.sqrt(max(n_chunks, 1))))


# Dot operands: fp16/bf16 inputs multiply in their own dtype; fp32 inputs in fp32 on tensor cores,
# "tf32x3" (three tf32 products, fp32-level accuracy) unless tf32 was allowed.
MATMUL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _matmul_dtype(dtype: torch.dtype):
    # Triton's CPU interpreter (3.6 and 3.9) returns garbage from tl.dot on bf16 operands (fp16 is
    # right), so interpreted runs keep bf16 inputs' operands in fp32; compiled kernels use bf16.
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32
    return MATMUL_DTYPES[dtype]


def _precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    return "tf32" if dtype != torch.float32 or allow_tf32 else "tf32x3"


def value_block(bk: int, bv: int) -> int:
    """Value columns per program of the linear memory: the ``[BK, BV]`` fp32 blocks of ``W``, ``S``
    and their gradients stay in registers, and every dot operand fits in shared memory. Past head
    dim 64, 16 columns: at head dim 128 the forward with 32 spilled (sm_90, Triton 3.9: 255
    registers, 44 bytes; with 16: 198 registers, none)."""
    return min(bv, 64 if bk <= 64 else 16)


def key_block(bk: int) -> int:
    """Key dimensions per block of the linear memory backward's streams over the keys. With 32 and
    64-token chunks every backward kernel compiles without spills for sm_90 at head dims 64 and 128
    (Triton 3.9 / 3.6; at most 234 registers, the sequential kernel at head dim 64; measured)."""
    return min(bk, 32)


def hidden_block(bhid: int) -> int:
    """Hidden units per block of the MLP memory's state stream (``W1[:, h]``, ``W2[h, :]`` and the momenta)
    and of its per-chunk ``[C, Dh]`` scratch tiles. 16: with 32 at head dim 64 and 64-token chunks the
    backward's sequential and queries kernels spilled (sm_90, Triton 3.9: 1328 / 232 bytes of spill
    stores); with 16 no MLP kernel of the compile gate spills (sm_90 and sm_80, Triton 3.6 and 3.9)."""
    return min(bhid, 16)


# Memory kernels: eight warps at every size.
NUM_WARPS = 8
# Gate kernels: eight warps spread their fp32 [C, C] accumulators thinly enough (C = 64: 216
# registers per thread in the backward, no spills; sm_90, measured).
GATE_NUM_WARPS = 8
# No software pipelining: the loops are sequential recurrences, and pipelining their loads would
# keep num_stages copies of every tile loaded in a loop (the streamed MLP state blocks, the chunk's
# rows) in shared memory: 160 KB at head dim 64 for the MLP forward with Triton's default of 3.
NUM_STAGES = 1


def _f32(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.float().contiguous()


class _Geometry:
    """Sizes of one call shared by forward and backward."""

    def __init__(self, q, v, weights, chunk_size):
        self.B, self.H, self.T, self.DK = q.shape
        self.DV = v.shape[-1]
        self.BH = self.B * self.H
        self.DH = weights[0].shape[-1] if len(weights) == 2 else self.DV
        self.C = chunk_size
        self.NC = triton.cdiv(self.T, chunk_size)
        self.R = checkpoint_every(self.NC)
        self.NSEG = max(1, triton.cdiv(self.NC, self.R))
        self.BK, self.BHID = _block(self.DK), _block(self.DH)
        # The linear memory's programs each own BV value columns; the MLP's one whole head.
        self.BV = value_block(self.BK, _block(self.DV)) if len(weights) == 1 else _block(self.DV)
        self.NV = triton.cdiv(self.DV, self.BV)
        self.BHB = hidden_block(self.BHID)
        # The MLP's per-chunk scratch tiles hold the hidden size padded to whole blocks.
        self.DHP = triton.cdiv(self.DH, self.BHB) * self.BHB


def _state_shapes(g: _Geometry, depth: int):
    if depth == 1:
        return [(g.DK, g.DV)]
    return [(g.DK, g.DH), (g.DH, g.DV)]


def _state_buffers(lead, shapes, has_momentum, dev):
    """fp32 ``[*lead, a, b]`` per layer for the weights and for the momentum (the same tensors without it)."""
    ws = [torch.empty(*lead, a, b, dtype=torch.float32, device=dev) for a, b in shapes]
    return ws, ([torch.empty_like(w) for w in ws] if has_momentum else ws)


def _gate_inputs(theta, alpha, eta):
    """``(theta, alpha, eta)`` for the gate kernels: ``theta`` stands in for an absent ``alpha`` or
    ``eta`` (the kernels never read it then)."""
    return (theta.contiguous(), (alpha if alpha is not None else theta).contiguous(),
            (eta if eta is not None else theta).contiguous())


# Per-token gate quantities, one row each of a [5, B * H * T] buffer: A, d, w_end, s_end, B (see
# triton_gates.py); and the same rows for their gradients.
GATE_VECTORS = 5


def chunk_gate_quantities(g: _Geometry, gate_inputs, has_momentum: bool, forget: bool):
    """Launch the gate kernel: ``(c * theta [B*H*NC, C, C], vectors [5, B*H*T])``, fp32."""
    dev = gate_inputs[0].device
    ct = torch.empty(g.BH * g.NC, g.C, g.C, dtype=torch.float32, device=dev)
    vec = torch.empty(GATE_VECTORS, g.BH * g.T, dtype=torch.float32, device=dev)
    titans_gates_fwd_kernel[(g.BH, g.NC)](
        *gate_inputs, ct, *vec, g.T, g.NC, BC=g.C, MOMENTUM=has_momentum, FORGET=forget,
        num_warps=GATE_NUM_WARPS, num_stages=NUM_STAGES,
    )
    return ct, vec


def _launch_args(g: _Geometry, depth, has_momentum, bias, p, delta, eps, mm_dtype, prec):
    """What the forward and the backward memory launches share: ``(scalars, constexpr keywords)``."""
    if depth == 1:
        sizes = dict(DK=g.DK, DV=g.DV, BK=g.BK, BV=g.BV)
    else:
        sizes = dict(D=g.DK, DH=g.DH, DHP=g.DHP, BD=g.BK, BHB=g.BHB)
    flags = dict(
        sizes, BC=g.C, MOMENTUM=has_momentum, BIAS=BIAS_IDS[bias], MM=mm_dtype, PREC=prec,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return (g.T, g.NC, g.R, p, delta, eps), flags


def titans_memory_fwd(q, k, v, theta, alpha, eta, weights, momentum, chunk_size, bias, p, delta, eps, prec):
    """Launch the forward kernel. Returns ``(y, final weights, final momentum, checkpoints, geometry)``."""
    g = _Geometry(q, v, weights, chunk_size)
    depth = len(weights)
    shapes = _state_shapes(g, depth)
    dev = q.device
    y = torch.empty(g.B, g.H, g.T, g.DV, dtype=q.dtype, device=dev)
    w0 = [_f32(w) for w in weights]
    s0 = [_f32(s) for s in momentum] if momentum is not None else w0
    wt, st = _state_buffers((g.B, g.H), shapes, momentum is not None, dev)
    ckw, cks = _state_buffers((g.BH * g.NSEG,), shapes, momentum is not None, dev)
    ct, vec = chunk_gate_quantities(g, _gate_inputs(theta, alpha, eta), momentum is not None, alpha is not None)
    gates = (ct, *vec)
    scalars, flags = _launch_args(
        g, depth, momentum is not None, bias, p, delta, eps, _matmul_dtype(q.dtype), prec
    )
    qkv = (q.contiguous(), k.contiguous(), v.contiguous())
    if depth == 1:
        titans_linear_fwd_kernel[(g.BH, g.NV)](
            *qkv, *gates, w0[0], s0[0], y, wt[0], st[0], ckw[0], cks[0], *scalars, **flags,
        )
    else:
        _mlp_fwd(g, qkv, gates, w0, s0, y, wt, st, ckw, cks, momentum is not None, scalars, flags)
    return y, tuple(wt), (tuple(st) if momentum is not None else None), (ckw, cks), g


def _mlp_fwd(g: _Geometry, qkv, gates, w0, s0, y, wt, st, ckw, cks, has_momentum, scalars, flags):
    """The MLP memory's forward, segment by segment: the state kernel carries the state (in ``wt, st``,
    updated in place) through the segment's chunks, storing their start states and residuals in
    scratch; the queries and the retrieval kernels then run one program per chunk (see triton_mlp.py)."""
    # The state kernel streams its running state through global memory, updating it in place.
    for dst, src in zip(wt + (st if has_momentum else []), w0 + (s0 if has_momentum else [])):
        dst.copy_(src)
    q, k, v = qkv
    scw, scs = _state_buffers((g.BH * g.R,), _state_shapes(g, 2), has_momentum, q.device)
    sres = torch.empty(g.BH * g.R, g.C, g.BK, dtype=torch.float32, device=q.device)
    sz, su, szq = (torch.empty(g.BH * g.R, g.C, g.DHP, dtype=torch.float32, device=q.device) for _ in range(3))
    ct, ga, gd = gates[:3]
    chunks = (g.BH, 1, g.R)
    for seg in range(g.NSEG):
        titans_mlp_fwd_state_kernel[(g.BH,)](
            k, v, *gates[1:], *wt, *st, *ckw, *cks, *scw, *scs, sres, sz, seg, *scalars, **flags,
        )
        titans_mlp_queries_kernel[chunks](q, k, ct, ga, gd, *scw, *scs, sres, sz, su, szq, seg, *scalars, **flags)
        titans_mlp_fwd_retrieve_kernel[chunks](
            q, ct, ga, gd, scw[1], scs[1], sres, sz, szq, y, seg, *scalars, **flags,
        )


def _mlp_bwd(g: _Geometry, qkv, gates, ckpt, dy, grads, dw0, ds0, has_momentum, scalars, flags):
    """The MLP memory's backward, segment by segment from the last: nine launches each (see
    triton_mlp.py): the recompute of the segment's chunk-start states, five per-chunk launches (grid
    axis 2: the segment's chunks) for the queries' activations, their gradients, dq and the retrieval's
    two sets of terms, the sequential state-gradient pass, per chunk dk and the gate gradients (two launches)."""
    q, k, v = qkv
    dev = q.device
    ckw, cks = ckpt
    shapes = _state_shapes(g, 2)
    dqp, dkp, dv, dct, dga, dgd, dgw, dgs, dgb = grads
    cur_w, cur_s = _state_buffers((g.BH,), shapes, has_momentum, dev)
    # Per chunk of a segment: its start state, its end state's gradients, the retrieval's share of its
    # start state's gradients.
    scw, scs = _state_buffers((g.BH * g.R,), shapes, has_momentum, dev)
    sgw, sgs = _state_buffers((g.BH * g.R,), shapes, has_momentum, dev)
    srw, srs = _state_buffers((g.BH * g.R,), shapes, has_momentum, dev)
    n = g.BH * g.R
    sres, sde, sdr = (torch.empty(n, g.C, g.BK, dtype=torch.float32, device=dev) for _ in range(3))
    sz, su, szq, sdzq, sdu, sdhk = (torch.empty(n, g.C, g.DHP, dtype=torch.float32, device=dev) for _ in range(6))
    sp1 = torch.empty(n, g.C, g.C, dtype=torch.float32, device=dev)
    ct, ga, gd, gw, gs, gb = gates
    chunks = (g.BH, 1, g.R)
    for seg in reversed(range(g.NSEG)):
        titans_mlp_bwd_recompute_kernel[(g.BH,)](
            k, v, ga, gd, gw, gs, gb, *cur_w, *cur_s, *ckw, *cks, *scw, *scs, sres, sz, seg, *scalars, **flags,
        )
        titans_mlp_queries_kernel[chunks](q, k, ct, ga, gd, *scw, *scs, sres, sz, su, szq, seg, *scalars, **flags)
        titans_mlp_bwd_queries_grad_kernel[chunks](
            q, dy, ct, ga, gd, *scw, *scs, sres, sz, szq, sdzq, sde, dga, dgd, dct, seg, *scalars, **flags,
        )
        titans_mlp_bwd_dq_kernel[chunks](
            q, k, dy, dqp, ct, ga, gd, scw[0], scs[0], su, sdzq, sp1, dct, seg, *scalars, **flags,
        )
        titans_mlp_bwd_retrieval_kernel[chunks](q, k, dy, ct, sres, szq, sdzq, sdu, sdhk, seg, *scalars, **flags)
        titans_mlp_bwd_start_share_kernel[chunks](
            q, dy, ga, gd, szq, sdzq, *srw, *srs, seg, *scalars, **flags,
        )
        titans_mlp_bwd_kernel[(g.BH,)](
            k, dv, ga, gd, gw, gs, gb, scw[1], sres, sz, sdu, sdhk, sde, sdr, *srw, *srs,
            *dw0, *ds0, *sgw, *sgs, seg, *scalars, **flags,
        )
        titans_mlp_bwd_dk_kernel[chunks](
            q, dkp, ct, gw, gs, scw[0], sgw[0], sgs[0], su, sdhk, sdr, sp1, seg, *scalars, **flags,
        )
        titans_mlp_bwd_grads_kernel[chunks](
            k, *scw, *scs, *sgw, *sgs, sres, sz, su, dga, dgd, dgw, dgs, dgb, seg, *scalars, **flags,
        )


def _linear_bwd(g: _Geometry, qkv, gates, ckpt, dy, grads, dw0, ds0, scw, scs, split, has_momentum, scalars, flags):
    """The linear memory's backward, segment by segment from the last: five launches each (see
    triton_linear.py): the chunk-start states' recompute, the per-chunk prep (grid axis 2: the
    segment's chunks), the sequential state-gradient pass, the per-chunk gradients (queries' side,
    keys' side)."""
    dev = dy.device
    ckw, cks = ckpt
    # Per-program scratch of [C, BV] tiles, one per chunk of a segment: E, g'(residuals), E's gradient then dr.
    sce, sch, scd = (torch.empty(g.BH * g.NV * g.R, g.C, g.BV, dtype=torch.float32, device=dev) for _ in range(3))
    # The chunk-end state gradients, like the chunk-start states' scratch.
    sgw, sgs = _state_buffers((g.BH * g.NV * g.R,), [(g.BK, g.BV)], has_momentum, dev)
    T, NC, R, p, delta, eps = scalars
    sizes = {n: flags[n] for n in ("DK", "DV", "BK", "BV", "BC", "MM", "PREC", "num_warps", "num_stages")}
    sizes["BKB"] = key_block(g.BK)
    dqp, dkp, dv, dct, *dvec = grads
    for seg in reversed(range(g.NSEG)):
        titans_linear_bwd_recompute_kernel[(g.BH, g.NV)](*qkv, *gates, ckw[0], cks[0], scw, scs, seg, *scalars, **flags)
        titans_linear_bwd_prep_kernel[(g.BH, g.NV, g.R)](
            *qkv, gates[0], dy, scw, sce, sch, scd, seg, *scalars, BIAS=flags["BIAS"], **sizes,
        )
        titans_linear_bwd_kernel[(g.BH, g.NV)](
            qkv[0], qkv[1], *gates[1:], dy, dv, sch, scd, sgw[0], sgs[0], dw0, ds0, seg, T, NC, R,
            MOMENTUM=has_momentum, **sizes,
        )
        for keys in (False, True):
            titans_linear_bwd_grads_kernel[(g.BH, g.NV, g.R)](
                qkv[0], qkv[1], gates[0], *gates[1:5], dy, dqp, dkp, dct, *dvec, scw, scs, sce, scd, sgw[0], sgs[0],
                seg, T, NC, R, MOMENTUM=has_momentum, SPLIT=split, KEYS=keys, **sizes,
            )


def titans_memory_bwd(q, k, v, theta, alpha, eta, ckpt, g, dy, dwt, dst, has_momentum, bias, p, delta, eps, prec):
    """Launch the backward kernel. Returns ``(dq, dk, dv, dtheta, dalpha, deta, dweights, dmomentum)``."""
    depth = len(dwt)
    shapes = _state_shapes(g, depth)
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # Kernels index rows contiguously: gradients must not inherit a transposed layout from q, k, v.
    # dq, dk and the gate quantities' gradients sum over the linear memory's value blocks (fp32
    # atomics into zeroed buffers).
    nv = g.NV if depth == 1 else 1
    split = nv > 1
    dqp, dkp = (torch.zeros(t.shape, dtype=torch.float32, device=dev) if split
                else torch.empty(t.shape, dtype=t.dtype, device=dev) for t in (q, k))
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    new = torch.zeros if split else torch.empty
    dct = new(g.BH * g.NC, g.C, g.C, dtype=torch.float32, device=dev)
    dvec = new(GATE_VECTORS, g.BH * g.T, dtype=torch.float32, device=dev)
    dth = torch.empty(g.B, g.H, g.T, dtype=torch.float32, device=dev)
    dal = torch.empty_like(dth) if alpha is not None else dth
    det = torch.empty_like(dth) if has_momentum else dth
    dw0, ds0 = _state_buffers((g.B, g.H), shapes, has_momentum, dev)
    gate_inputs = _gate_inputs(theta, alpha, eta)
    ct, vec = chunk_gate_quantities(g, gate_inputs, has_momentum, alpha is not None)
    gates = (ct, *vec)
    scalars, flags = _launch_args(g, depth, has_momentum, bias, p, delta, eps, _matmul_dtype(q.dtype), prec)
    qkv = (q, k, v)
    grads = (dqp, dkp, dv, dct, *dvec)
    # The kernels turn the end state's gradients into the start state's, in place.
    for dst_, src in zip(dw0 + (ds0 if has_momentum else []), list(dwt) + (list(dst) if has_momentum else [])):
        dst_.copy_(src)
    if depth == 1:
        # Scratch for one segment's recomputed chunk-start states, per program.
        scw, scs = _state_buffers((g.BH * nv * g.R,), [(g.BK, g.BV)], has_momentum, dev)
        _linear_bwd(g, qkv, gates, ckpt, dy.contiguous(), grads, dw0[0], ds0[0], scw[0], scs[0], split, has_momentum,
                    scalars, flags)
    else:
        _mlp_bwd(g, qkv, gates, ckpt, dy.contiguous(), grads, dw0, ds0, has_momentum, scalars, flags)
    titans_gates_bwd_kernel[(g.BH, g.NC)](
        *gate_inputs, dct, *dvec, dth, dal, det, g.T, g.NC, BC=g.C, MOMENTUM=has_momentum, FORGET=alpha is not None,
        num_warps=GATE_NUM_WARPS, num_stages=NUM_STAGES,
    )
    dq, dk = dqp.to(q.dtype), dkp.to(k.dtype)
    return (dq, dk, dv, dth, dal if alpha is not None else None, det if has_momentum else None,
            tuple(dw0), tuple(ds0) if has_momentum else None)


class TitansMemoryFunction(torch.autograd.Function):
    """Autograd wrapper; tensors are passed flat: q, k, v, theta, alpha, eta, *weights, *momentum."""

    @staticmethod
    def forward(ctx, depth, has_momentum, chunk_size, bias, p, delta, eps, prec, q, k, v, theta, alpha, eta, *state):
        weights = state[:depth]
        momentum = state[depth:] if has_momentum else None
        y, wt, st, ckpt, g = titans_memory_fwd(
            q, k, v, theta, alpha, eta, weights, momentum, chunk_size, bias, p, delta, eps, prec
        )
        ctx.save_for_backward(q, k, v, theta, alpha, eta, *ckpt[0], *ckpt[1])
        ctx.cfg = (depth, has_momentum, bias, p, delta, eps, prec, g)
        ctx.dtypes = [s.dtype for s in state]
        return (y, *wt, *(st or ()))

    @staticmethod
    def backward(ctx, dy, *dstate):
        depth, has_momentum, bias, p, delta, eps, prec, g = ctx.cfg
        q, k, v, theta, alpha, eta, *ck = ctx.saved_tensors
        ckpt = (ck[:depth], ck[depth:])
        shapes = _state_shapes(g, depth)

        def grad_or_zero(t, shape):
            if t is None:
                return torch.zeros(g.B, g.H, *shape, dtype=torch.float32, device=q.device)
            return t.float().contiguous()

        dwt = [grad_or_zero(dstate[i], shapes[i]) for i in range(depth)]
        dst = [grad_or_zero(dstate[depth + i], shapes[i]) for i in range(depth)] if has_momentum else dwt
        if dy is None:
            dy = torch.zeros(g.B, g.H, g.T, g.DV, dtype=q.dtype, device=q.device)
        dq, dk, dv, dth, dal, det, dw0, ds0 = titans_memory_bwd(
            q, k, v, theta, alpha, eta, ckpt, g, dy, dwt, dst, has_momentum, bias, p, delta, eps, prec
        )
        dstate0 = [d.to(t) for d, t in zip(dw0 + (ds0 or ()), ctx.dtypes)]
        return (
            None, None, None, None, None, None, None, None,
            dq, dk, dv, dth.to(theta.dtype),
            dal.to(alpha.dtype) if dal is not None else None,
            det.to(eta.dtype) if det is not None else None,
            *dstate0,
        )


def titans_memory_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    weights: Sequence[torch.Tensor],
    alpha: Optional[torch.Tensor],
    eta: Optional[torch.Tensor],
    momentum: Optional[Sequence[torch.Tensor]],
    chunk_size: int,
    bias: str,
    p: float,
    delta: float,
    eps: float,
    allow_tf32: bool,
):
    """Triton path of ``memlayers.ops.titans.titans_memory`` (arguments validated there).

    Shapes: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, ``theta, alpha, eta [B, H, T]``, ``weights``
    ``(W [B, H, Dk, Dv],)`` or ``(W1 [B, H, D, Dh], W2 [B, H, Dh, D])``, ``momentum`` like weights
    or None. Returns ``(y [B, H, T, Dv], final weights, final momentum or None)``.

    Example:
        >>> y, w, s = titans_memory_triton(q, k, v, theta, (W0,), alpha, eta, (S0,), 64, "l2", 3.0, 1.0, 1e-6, False)
    """
    depth = len(weights)
    has_momentum = momentum is not None
    out = TitansMemoryFunction.apply(
        depth, has_momentum, chunk_size, bias, p, delta, eps, _precision(q.dtype, allow_tf32),
        q, k, v, theta, alpha, eta, *weights, *(momentum or ()),
    )
    y, rest = out[0], out[1:]
    return y, tuple(rest[:depth]), (tuple(rest[depth:]) if has_momentum else None)
