"""``knn_search``: fused exact top-k search over a memory of keys."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..utils import (FLOAT_DTYPES, check_choice, check_positive_int, check_same_device, check_tensor, load_triton_module,
                     resolve_backend)
from .naive import knn_search_naive
from .native import knn_search_native_lib

METRICS = ("ip", "cosine", "l2")


def knn_search(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    valid_lengths: Optional[torch.Tensor] = None,
    metric: str = "ip",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k search of every query among the keys of its batch row and kv-head.

    Args:
        queries: ``[B, Hq, T, D]``, fp32/fp16/bf16, D in 1..256.
        keys: ``[B, Hkv, M, D]``, same dtype and device; ``Hq`` a multiple of ``Hkv`` (grouped-query:
            query head ``h`` searches kv-head ``h // (Hq // Hkv)``). Any strides; on CPU, keys laid
            out dim-major (``keys.stride(-2) == 1``, as ``KNNMemory`` stores them there) search a few
            queries up to 3x faster than contiguous ones.
        k: results per query, any int >= 0 (results past the number of valid keys are marked). The
            Triton kernel serves k up to ``memlayers.ops.knn_search.triton.MAX_KERNEL_K`` (256); the
            Triton backend runs larger k on the torch path (scores in query chunks, then torch.topk).
        valid_lengths: optional ``[B]`` or ``[B, Hkv]`` integer tensor: only slots ``< valid_lengths``
            are searched (a memory that is not full yet).
        metric: ``"ip"`` (q.k), ``"cosine"`` or ``"l2"`` (scores are ``-||q-k||^2``); higher is better.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"``, ``"triton"``, or ``"native"`` (the
            optional CMake-built CPU library, fp32 only; for a few queries it beats the torch path on
            contiguous keys but not on dim-major ones, and it loses to BLAS for many queries, so
            ``"auto"`` never picks it).

    Returns:
        ``(scores [B, Hq, T, k] fp32, indices [B, Hq, T, k] int64)``, best first; a missing result has
        score ``-inf`` and index ``-1``.

    Non-finite values (the same rule in every backend, checked without a host sync): a slot whose
    score is NaN (a NaN in its key or in the query, or ``inf - inf``) is no match, never returned,
    so a query row holding NaN gets only missing results (``-inf``, ``-1``). Infinite scores rank
    by value; a ``-inf`` score is a missing result too.

    Example:
        >>> import torch, memlayers as ml
        >>> q, keys = torch.randn(1, 4, 3, 64), torch.randn(1, 2, 1000, 64)
        >>> scores, idx = ml.knn_search(q, keys, k=5)
        >>> scores.shape, idx.shape
        (torch.Size([1, 4, 3, 5]), torch.Size([1, 4, 3, 5]))
    """
    check_tensor("queries", queries, ndim=4, dtypes=FLOAT_DTYPES)
    B, Hq, T, D = queries.shape
    check_tensor("keys", keys, shape=(B, None, None, D), dtypes=(queries.dtype,))
    check_same_device(queries=queries, keys=keys)
    Hkv = keys.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"queries' head count ({Hq}) must be a multiple of keys' head count ({Hkv})")
    if not 1 <= D <= 256:
        raise ValueError(f"queries' last dimension D must be in 1..256, got {D}")
    check_positive_int("k", k, minimum=0)
    check_choice("metric", metric, METRICS)
    if valid_lengths is not None:
        check_tensor("valid_lengths", valid_lengths, dtypes=(torch.int32, torch.int64))
        if tuple(valid_lengths.shape) not in ((B,), (B, Hkv)):
            raise ValueError(f"valid_lengths must have shape ({B},) or ({B}, {Hkv}), got {tuple(valid_lengths.shape)}")
        check_same_device(queries=queries, valid_lengths=valid_lengths)

    chosen = resolve_backend(backend, queries, keys, op="knn_search")
    if B * Hq * T * k == 0:  # no query or no result asked: empty results of the right shape
        return (torch.full((B, Hq, T, k), float("-inf"), device=queries.device),
                torch.full((B, Hq, T, k), -1, dtype=torch.int64, device=queries.device))
    if chosen == "native":
        return knn_search_native_lib(queries, keys, k, valid_lengths, metric)
    if chosen == "triton":
        return load_triton_module("knn_search").knn_search_triton(queries, keys, k, valid_lengths, metric)
    return knn_search_naive(queries, keys, k, valid_lengths, metric)


__all__ = ["knn_search", "knn_search_naive", "METRICS"]
