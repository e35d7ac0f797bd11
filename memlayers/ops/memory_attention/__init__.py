"""``memory_attention``: attention of each query over its own k memories, gathered by index inside the
kernel, returning the log-sum-exp so that it merges exactly with a local attention pass
(``memlayers.ops.local_attention`` gives one with its log-sum-exp; ``merge_attention`` joins them)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..utils import FLOAT_DTYPES, check_same_device, check_tensor, empty_result, load_triton_module, resolve_backend
from .naive import memory_attention_naive, merge_attention_naive, rotate_half

MAX_HEAD_DIM = 256
INDEX_DTYPES = (torch.int32, torch.int64)


def _check_inputs(q, mem_keys, mem_values, indices, scale, mem_positions, rotary_cos, rotary_sin,
                  validate: bool) -> float:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, Hq, T, D = q.shape
    check_tensor("mem_keys", mem_keys, shape=(B, None, None, D), dtypes=(q.dtype,))
    Hkv, C = mem_keys.shape[1], mem_keys.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q's head count ({Hq}) must be a multiple of mem_keys' head count ({Hkv})")
    check_tensor("mem_values", mem_values, shape=(B, Hkv, C, None), dtypes=(q.dtype,))
    check_tensor("indices", indices, shape=(B, Hq, T, None), dtypes=INDEX_DTYPES)
    check_same_device(q=q, mem_keys=mem_keys, mem_values=mem_values, indices=indices,
                      mem_positions=mem_positions, rotary_cos=rotary_cos, rotary_sin=rotary_sin)
    Dv = mem_values.shape[3]
    if not (1 <= D <= MAX_HEAD_DIM and 1 <= Dv <= MAX_HEAD_DIM):
        raise ValueError(f"head dims must be in 1..{MAX_HEAD_DIM}, got q/mem_keys D={D}, mem_values Dv={Dv}")
    if scale is None:
        scale = D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")

    rotary = (rotary_cos is not None, rotary_sin is not None, mem_positions is not None)
    if any(rotary) and not all(rotary):
        raise ValueError("rotate-on-read needs all of mem_positions, rotary_cos and rotary_sin (or none of them); "
                         f"got mem_positions={rotary[2]}, rotary_cos={rotary[0]}, rotary_sin={rotary[1]}")
    if all(rotary):
        if D % 2:
            raise ValueError(f"rotary embedding needs an even head dim, got q with D={D}")
        check_tensor("rotary_cos", rotary_cos, shape=(None, D), dtypes=FLOAT_DTYPES)
        check_tensor("rotary_sin", rotary_sin, shape=tuple(rotary_cos.shape), dtypes=FLOAT_DTYPES)
        check_tensor("mem_positions", mem_positions, shape=(B, C), dtypes=INDEX_DTYPES)

    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    # Out-of-range indices or positions would read outside the buffers: one host sync checks both
    # (skipped with validate=False, for indices that come from a search of these same buffers).
    if validate and indices.numel():
        bad_index = (indices < -1) | (indices >= C)
        problems = [bad_index.any()]
        if all(rotary):
            safe = indices.clamp(0, max(C - 1, 0)).long().reshape(B, -1)
            pos = mem_positions.long().gather(1, safe) if C else safe
            used = (indices >= 0).reshape(B, -1)
            problems.append((used & ((pos < 0) | (pos >= rotary_cos.shape[0]))).any())
        flags = torch.stack(problems).tolist()
        if flags[0]:
            raise ValueError(f"indices must be -1 (missing) or slot ids in 0..{C - 1}, got values in "
                             f"{int(indices.min())}..{int(indices.max())}")
        if len(flags) > 1 and flags[1]:
            raise ValueError(f"mem_positions of the retrieved slots must lie in 0..{rotary_cos.shape[0] - 1} "
                             "(rows of rotary_cos/rotary_sin)")
    return float(scale)


def memory_attention(
    q: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: Optional[float] = None,
    mem_positions: Optional[torch.Tensor] = None,
    rotary_cos: Optional[torch.Tensor] = None,
    rotary_sin: Optional[torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over its own k retrieved memories, gathered by slot id.

    Args:
        q: ``[B, Hq, T, D]`` queries (already rotated at their own positions when rotary is used),
            fp32/fp16/bf16, D in 1..256.
        mem_keys: ``[B, Hkv, C, D]`` memory keys, q's dtype; ``Hq`` a multiple of ``Hkv`` (query head
            ``h`` reads kv-head ``h // (Hq // Hkv)``; the buffers are never expanded to Hq heads).
        mem_values: ``[B, Hkv, C, Dv]``, q's dtype, Dv in 1..256.
        indices: ``[B, Hq, T, k]`` int32/int64 slot ids into dim 2 of the buffers, ``-1`` = missing
            (ignored); e.g. ``KNNMemory.search(q, k, gather=False).indices``. ``k = 0``, ``C = 0`` or
            ``T = 0`` make every query empty (gradients: zeros).
        scale: score scale, default ``D ** -0.5``.
        mem_positions: ``[B, C]`` int positions of the slots (``KNNMemory.positions``); with
            ``rotary_cos``/``rotary_sin`` (``[P, D]`` tables, HF ``rotate_half`` convention) each
            gathered key is rotated at its stored position before the dot: keys stored before RoPE,
            rotated on read. All three or none.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.
        validate: check that every index is ``-1`` or a slot id in ``0..C-1`` and (rotary) that the
            retrieved slots' positions are rows of the tables, raising ValueError otherwise. It reads
            the device (one host sync per call); pass ``False`` for indices a search of these same
            buffers produced (e.g. each decode step of a kNN layer): out-of-range indices then read
            outside the buffers. Every other argument check reads no tensor data and always runs.

    Returns:
        ``(out [B, Hq, T, Dv] in q's dtype, lse [B, Hq, T] fp32)``; a query with no valid memory gets
        ``out = 0``, ``lse = -inf``. Differentiable in q, and in mem_keys/mem_values (and nothing
        else) when they require grad.

    Example:
        >>> import torch
        >>> from memlayers.ops.memory_attention import memory_attention
        >>> q = torch.randn(2, 8, 5, 64)
        >>> keys, values = torch.randn(2, 4, 100, 64), torch.randn(2, 4, 100, 64)
        >>> idx = torch.randint(0, 100, (2, 8, 5, 16))
        >>> out, lse = memory_attention(q, keys, values, idx)
        >>> out.shape, lse.shape
        (torch.Size([2, 8, 5, 64]), torch.Size([2, 8, 5]))
    """
    scale = _check_inputs(q, mem_keys, mem_values, indices, scale, mem_positions, rotary_cos, rotary_sin, validate)
    backend = resolve_backend(backend, q, mem_keys, mem_values, indices, op="memory_attention")
    B, Hq, T, _ = q.shape
    if B * Hq * T == 0 or mem_keys.shape[2] == 0 or indices.shape[3] == 0:  # nothing to gather: every query is empty
        inputs = (q, mem_keys, mem_values)
        return (empty_result((B, Hq, T, mem_values.shape[3]), 0.0, q.dtype, q.device, *inputs),
                empty_result((B, Hq, T), float("-inf"), torch.float32, q.device, *inputs))
    if backend == "triton":
        return load_triton_module("memory_attention").memory_attention_triton(
            q, mem_keys, mem_values, indices, scale, mem_positions, rotary_cos, rotary_sin)
    return memory_attention_naive(q, mem_keys, mem_values, indices, scale, mem_positions, rotary_cos, rotary_sin)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact joint softmax from two partial softmaxes over disjoint key sets (differentiable).

    Args:
        out_a: ``[..., Dv]`` normalized output of softmax A (e.g. local causal attention), fp16/bf16/fp32/fp64.
        lse_a: ``[...]`` its log-sum-exp (``-inf`` where A had no key).
        out_b: ``[..., Dv]`` and lse_b ``[...]``: the same for softmax B (e.g. ``memory_attention``).

    Returns:
        ``(out [..., Dv] in out_a's dtype, lse [...] fp32, fp64 for fp64 inputs)``: the output and log-sum-exp of one softmax
        over the union of both key sets; ``out = 0``, ``lse = -inf`` where both were empty.

    Example:
        >>> import torch
        >>> from memlayers.ops.memory_attention import merge_attention
        >>> out, lse = merge_attention(torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5),
        ...                            torch.randn(1, 2, 5, 8), torch.full((1, 2, 5), float("-inf")))
        >>> out.shape, lse.shape
        (torch.Size([1, 2, 5, 8]), torch.Size([1, 2, 5]))
    """
    dtypes = FLOAT_DTYPES + (torch.float64,)
    check_tensor("out_a", out_a, dtypes=dtypes)
    if out_a.dim() < 1:
        raise ValueError(f"out_a must have a value dimension, got shape {tuple(out_a.shape)}")
    check_tensor("out_b", out_b, shape=tuple(out_a.shape), dtypes=dtypes)
    check_tensor("lse_a", lse_a, shape=tuple(out_a.shape[:-1]), dtypes=dtypes)
    check_tensor("lse_b", lse_b, shape=tuple(out_a.shape[:-1]), dtypes=dtypes)
    check_same_device(out_a=out_a, lse_a=lse_a, out_b=out_b, lse_b=lse_b)
    return merge_attention_naive(out_a, lse_a, out_b, lse_b)


__all__ = ["memory_attention", "memory_attention_naive", "merge_attention", "merge_attention_naive",
           "rotate_half"]
