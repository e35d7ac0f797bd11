"""``local_attention``: causal attention over [an optional prefix, the current segment] that also
returns its log-sum-exp, so that it merges exactly with another softmax (``merge_attention`` with the
retrieved memories of ``memory_attention``). SDPA returns no log-sum-exp, nor takes its gradient."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..utils import FLOAT_DTYPES, check_same_device, check_tensor, empty_result, load_triton_module, resolve_backend
from .naive import local_attention_naive

MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, scale, prefix_valid) -> float:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, Hq, T, D = q.shape
    check_tensor("k", k, shape=(B, None, None, D), dtypes=(q.dtype,))
    Hkv, S = k.shape[1], k.shape[2]
    check_tensor("v", v, shape=(B, Hkv, S, None), dtypes=(q.dtype,))
    check_same_device(q=q, k=k, v=v, prefix_valid=prefix_valid)
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of k's head count ({Hkv})")
    if S < T:
        raise ValueError(f"k must hold at least the T={T} keys of the queries, got S={S}")
    Dv = v.shape[3]
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in 1..{MAX_HEAD_DIM}, got q/k D={D}, v Dv={Dv}")
    if prefix_valid is not None:
        check_tensor("prefix_valid", prefix_valid, shape=(B,), dtypes=(torch.bool,))
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    prefix_valid: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of T queries over ``S = P + T`` keys: a prefix of P keys (e.g. the previous
    segment) that every query sees, then the T keys of the queries themselves, causally.

    Args:
        q: ``[B, Hq, T, D]``, fp32/fp16/bf16, D in 1..256.
        k: ``[B, Hkv, S, D]``; v: ``[B, Hkv, S, Dv]`` (q's dtype, Dv in 1..256, ``S >= T``); ``Hq`` a
            multiple of ``Hkv`` (query head ``h`` reads kv-head ``h // (Hq // Hkv)``, never expanded).
        scale: score scale, default ``D ** -0.5``.
        prefix_valid: optional ``[B]`` bool: rows where the P prefix keys are hidden are False.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.

    Returns:
        ``(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32)``; computed in fp32, differentiable
        through both (in q, k and v).

    Example:
        >>> import torch
        >>> from memlayers.ops.local_attention import local_attention
        >>> q, k, v = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
        >>> out, lse = local_attention(q, k, v)
        >>> out.shape, lse.shape
        (torch.Size([1, 4, 10, 16]), torch.Size([1, 4, 10]))
    """
    scale = _check_inputs(q, k, v, scale, prefix_valid)
    backend = resolve_backend(backend, q, k, v, op="local_attention")
    B, Hq, T, _ = q.shape
    if B * Hq * T == 0:  # no query: empty outputs, and zero gradients for k and v
        return (empty_result((B, Hq, T, v.shape[3]), 0.0, q.dtype, q.device, q, k, v),
                empty_result((B, Hq, T), 0.0, torch.float32, q.device, q, k, v))
    if backend == "triton":
        return load_triton_module("local_attention").local_attention_triton(q, k, v, scale, prefix_valid)
    return local_attention_naive(q, k, v, scale, prefix_valid)


__all__ = ["local_attention", "local_attention_naive"]
