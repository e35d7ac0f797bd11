"""``titans_memory``: chunked Titans / Miras test-time memory (linear or MLP), one dispatching entry."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..utils import (
    FLOAT_DTYPES,
    check_choice,
    check_positive_int,
    check_same_device,
    check_tensor,
    load_triton_module,
    resolve_backend,
)
from .naive import BIASES, memory_apply, titans_chunked_naive, titans_recurrent_naive

State = Tuple[torch.Tensor, ...]
MAX_KERNEL_DIM = 256
# The MLP kernels stream the hidden dimension in blocks, so it is bounded only by memory; 4x the
# largest head dim is the range they are checked (compiled) for.
MAX_KERNEL_HIDDEN = 4 * MAX_KERNEL_DIM
# Chunk sizes the kernels take: tl.dot tiles need >= 16; past 64 the [C, D] tiles outgrow the budget
# of registers and shared memory the kernels are sized for (larger chunks run on the torch path).
KERNEL_CHUNKS = (16, 32, 64)
# Before the MLP kernels' split (issue 13), past head dim 128 the backward of a 64-token chunk needed
# 258 KB of shared memory (sm_90; the limit is 227 KB), of a 32-token chunk 102 KB, hence the limit:
# wider MLP heads take chunks up to 32 on the kernels. Split (and blocked over the head dim), at head
# dim 256, hidden 1024, they take at most 122,880 bytes with 64-token chunks (sm_90, Triton 3.9,
# measured) but still spill registers there (the dq and dk kernels 132 bytes each; with 16-token
# chunks up to 252: docs/gpu.md), so the limit stays until that is measured on a GPU.
MLP_WIDE_HEAD, MLP_WIDE_MAX_CHUNK = 128, 32


def _check_float(name: str, value, *, positive: bool = False, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (minimum is not None and value < minimum):
        want = "> 0" if positive else f">= {minimum}"
        raise ValueError(f"{name} must be finite and {want}, got {value}")
    return value


def check_memory_inputs(q, k, v, theta, weights, alpha, eta, momentum) -> None:
    """Validate shapes, dtypes and devices of ``titans_memory``'s tensors (raises; reads no tensor data)."""
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, T, Dk = q.shape
    check_tensor("k", k, shape=(B, H, T, Dk), dtypes=(q.dtype,))
    check_tensor("v", v, shape=(B, H, T, None), dtypes=(q.dtype,))
    Dv = v.shape[-1]
    check_tensor("theta", theta, shape=(B, H, T), dtypes=FLOAT_DTYPES)
    if alpha is not None:
        check_tensor("alpha", alpha, shape=(B, H, T), dtypes=FLOAT_DTYPES)
    if eta is not None:
        check_tensor("eta", eta, shape=(B, H, T), dtypes=FLOAT_DTYPES)
    if not isinstance(weights, (tuple, list)) or len(weights) == 0:
        raise TypeError(f"weights must be a non-empty tuple of tensors, got {type(weights).__name__}")
    if len(weights) > 1 and Dk != Dv:
        raise ValueError(f"the MLP memory is residual: q's last dimension ({Dk}) must equal v's ({Dv})")
    d_in = Dk
    for i, w in enumerate(weights):
        d_out = Dv if i == len(weights) - 1 else None
        check_tensor(f"weights[{i}]", w, shape=(B, H, d_in, d_out), dtypes=FLOAT_DTYPES)
        d_in = w.shape[-1]
    if momentum is not None:
        if eta is None:
            raise ValueError("momentum was given but eta is None (no momentum); pass eta or drop momentum")
        if not isinstance(momentum, (tuple, list)) or len(momentum) != len(weights):
            got = len(momentum) if isinstance(momentum, (tuple, list)) else type(momentum).__name__
            raise ValueError(f"momentum must be a tuple of {len(weights)} tensors like weights, got {got}")
        for i, (s, w) in enumerate(zip(momentum, weights)):
            check_tensor(f"momentum[{i}]", s, shape=tuple(w.shape), dtypes=FLOAT_DTYPES)
    named = dict(q=q, k=k, v=v, theta=theta, alpha=alpha, eta=eta)
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    named.update({f"momentum[{i}]": s for i, s in enumerate(momentum or ())})
    check_same_device(**named)


# Ranges of the documented recurrence: W_t = (1 - alpha_t) W_{t-1} + S_t, S_t = eta_t S_{t-1} - theta_t g_t.
GATE_RANGES = {"theta": (0.0, math.inf), "alpha": (0.0, 1.0), "eta": (0.0, 1.0)}


def check_memory_values(q, k, v, theta, weights, alpha, eta, momentum) -> None:
    """Reject non-finite tensors and gates outside ``GATE_RANGES``, naming the first bad argument.

    Every condition is reduced on the tensors' device into one flag vector that is read back once:
    a single host synchronization per call on a GPU, whatever the number of arguments.
    """
    named = dict(q=q, k=k, v=v, theta=theta, alpha=alpha, eta=eta)
    named.update({f"weights[{i}]": w for i, w in enumerate(weights)})
    named.update({f"momentum[{i}]": s for i, s in enumerate(momentum or ())})
    named = {n: t for n, t in named.items() if t is not None}
    checks = [(f"{n} contains non-finite values (NaN or inf)", ~torch.isfinite(t).all()) for n, t in named.items()]
    for n, (lo, hi) in GATE_RANGES.items():
        if n in named:
            t = named[n]
            checks.append((f"{n} must lie in [{lo}, {hi}] (the range of its recurrence)", ((t < lo) | (t > hi)).any()))
    flags = torch.stack([f for _, f in checks]).tolist()
    for (message, _), bad in zip(checks, flags):
        if bad:
            raise ValueError(message)


def kernel_supports(weights: Sequence[torch.Tensor], q: torch.Tensor, v: torch.Tensor, chunk_size: int) -> Optional[str]:
    """Why the Triton kernels cannot run this call (None when they can)."""
    if len(weights) > 2:
        return f"the kernels implement the linear memory and the depth-2 MLP, got depth {len(weights)}"
    if chunk_size not in KERNEL_CHUNKS:
        return f"the kernels need chunk_size in {KERNEL_CHUNKS}, got {chunk_size}"
    if len(weights) == 2 and q.shape[-1] > MLP_WIDE_HEAD and chunk_size > MLP_WIDE_MAX_CHUNK:
        return (f"the MLP kernels need chunk_size <= {MLP_WIDE_MAX_CHUNK} past head dim {MLP_WIDE_HEAD} "
                f"(shared memory), got chunk_size {chunk_size} at head dim {q.shape[-1]}")
    if max(q.shape[-1], v.shape[-1]) > MAX_KERNEL_DIM:
        return f"the kernels support head dims up to {MAX_KERNEL_DIM}, got {max(q.shape[-1], v.shape[-1])}"
    if len(weights) == 2 and weights[0].shape[-1] > MAX_KERNEL_HIDDEN:
        return f"the kernels support MLP hidden sizes up to {MAX_KERNEL_HIDDEN}, got {weights[0].shape[-1]}"
    return None


def titans_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    weights: Sequence[torch.Tensor],
    *,
    alpha: Optional[torch.Tensor] = None,
    eta: Optional[torch.Tensor] = None,
    momentum: Optional[Sequence[torch.Tensor]] = None,
    chunk_size: int = 64,
    bias: str = "l2",
    p: float = 3.0,
    delta: float = 1.0,
    eps: float = 1e-6,
    allow_tf32: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> Tuple[torch.Tensor, State, Optional[State]]:
    """Read a sequence into a Titans memory, chunk by chunk, and retrieve with every query.

    For each batch row and head, token ``t`` takes a gradient step on ``loss(M(k_t) - v_t)`` with
    momentum ``eta_t``, learning rate ``theta_t`` and forgetting ``alpha_t``; ``y_t = M_t(q_t)``.
    Inside a chunk all gradients are taken at the chunk-start weights (see ``naive.py`` for the
    exact formulas). Differentiable with respect to every tensor argument.

    Args:
        q, k: ``[B, H, T, Dk]`` fp32/fp16/bf16 (Titans l2-normalizes them; not done here).
        v: ``[B, H, T, Dv]``, same dtype.
        theta: ``[B, H, T]`` learning rates (>= 0).
            ``T`` may be 0: empty ``y``, unchanged (copied) states, empty gradients.
        weights: initial memory: ``(W,)`` with ``W [B, H, Dk, Dv]`` (linear memory), or
            ``(W_1, ..., W_L)`` (residual MLP ``x + silu(... silu(x W_1) ...) W_L``, ``Dk == Dv``;
            ``W_1 [B, H, Dk, Dh]``, ``W_L [B, H, Dh, Dv]``).
        alpha: ``[B, H, T]`` forget gates in [0, 1] (weight decay), or None for no forgetting.
        eta: ``[B, H, T]`` momentum gates in [0, 1], or None for no momentum (``S_t = -theta_t g_t``).
        momentum: initial surprise, same shapes as ``weights`` (zeros when None); only with ``eta``.
        chunk_size: tokens per chunk (the kernels take 16, 32 or 64; the MLP past head dim 128 up
            to 32). 1 = exact recurrence.
        bias: attentional bias ``"l2"`` (Titans), ``"lp"`` (Moneta, exponent ``p``, smoothing
            ``eps``) or ``"huber"`` (Yaad, threshold ``delta``).
        allow_tf32: let fp32 inputs use tf32 matmuls in the kernels (fp16/bf16 inputs always may).
        validate: check the tensors' values (finite; theta >= 0, alpha and eta in [0, 1]). Shapes,
            dtypes, devices and the scalar options are always checked on the host without reading any
            tensor; the value checks cost one device-to-host read per call (a synchronization on a
            GPU), so a caller that already guarantees them (e.g. gates from a sigmoid, in decode) may
            pass False.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``. The kernels cover the linear memory and the
            depth-2 MLP; "auto" falls back to the torch path for other cases.

    Returns:
        ``(y [B, H, T, Dv] in q's dtype, final weights (fp32), final momentum (fp32) or None)``.

    Example:
        >>> import torch, memlayers as ml
        >>> B, H, T, D = 1, 2, 100, 32
        >>> q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        >>> theta, alpha, eta = torch.full((B, H, T), 0.01), torch.full((B, H, T), 0.01), torch.full((B, H, T), 0.9)
        >>> W0 = torch.zeros(B, H, D, D)
        >>> y, (W,), (S,) = ml.titans_memory(q, k, v, theta, (W0,), alpha=alpha, eta=eta, chunk_size=16)
        >>> y.shape, W.shape
        (torch.Size([1, 2, 100, 32]), torch.Size([1, 2, 32, 32]))
    """
    check_memory_inputs(q, k, v, theta, weights, alpha, eta, momentum)
    check_positive_int("chunk_size", chunk_size)
    check_choice("bias", bias, BIASES)
    p = _check_float("p", p, minimum=1.0)
    delta = _check_float("delta", delta, positive=True)
    eps = _check_float("eps", eps, positive=True)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    if validate:
        check_memory_values(q, k, v, theta, weights, alpha, eta, momentum)
    if eta is not None and momentum is None:
        momentum = tuple(torch.zeros_like(w, dtype=torch.float32) for w in weights)
    weights, momentum = tuple(weights), (tuple(momentum) if momentum is not None else None)

    chosen = resolve_backend(backend, q, k, v)
    if chosen == "triton" and q.shape[2] > 0:  # an empty sequence leaves the kernels nothing to do
        why_not = kernel_supports(weights, q, v, chunk_size)
        if why_not is None:
            mod = load_triton_module("titans")
            return mod.titans_memory_triton(
                q, k, v, theta, weights, alpha, eta, momentum, chunk_size, bias, p, delta, eps, allow_tf32
            )
        if backend == "triton":
            raise ValueError(f"backend='triton': {why_not}")
    y, w, s = titans_chunked_naive(q, k, v, theta, alpha, eta, weights, momentum, chunk_size, bias, p, delta, eps)
    return y.to(q.dtype), w, s


__all__ = [
    "BIASES",
    "memory_apply",
    "titans_chunked_naive",
    "titans_memory",
    "titans_recurrent_naive",
]
