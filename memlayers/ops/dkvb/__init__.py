"""``dkvb_lookup``: the Discrete Key-Value Bottleneck read (nearest keys per codebook, fetch values)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..utils import (FLOAT_DTYPES, check_positive_int, check_same_device, check_tensor, load_triton_module,
                     renamed_argument, resolve_backend)
from .naive import dkvb_distances, dkvb_lookup_naive


def dkvb_lookup(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k: int = 1,
    key_mask: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    backend: str = "auto",
    *,
    topk: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per codebook, find the ``k`` nearest keys (squared L2) and return the mean of their values.

    ``out[b, c] = mean_j values[c, indices[b, c, j]]``. The Triton kernel fuses distance, top-k and
    value fetch in one pass per codebook (no ``[C, B, N]`` distance matrix, no one-hot); its backward
    scatters ``grad_out / k`` into the fetched value rows only. Only ``values`` gets a gradient
    (nearest-key selection is piecewise constant; DKVB keys are frozen).

    Args:
        queries: ``[B, C, Dk]`` projected inputs, fp32/fp16/bf16.
        keys: ``[C, N, Dk]`` frozen keys, same dtype.
        values: ``[C, N, Dv]`` values, fp32/fp16/bf16 (any of them).
        k: keys fetched per codebook, ``1 <= k <= N``.
        key_mask: optional ``[C, N]`` bool; keys marked False are never selected (e.g. pairs never
            trained). Every codebook needs at least ``k`` True entries.
        deterministic: Triton backward by sorted segment reduction (bitwise reproducible) instead of
            fp32 atomics.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.
        topk: deprecated name of ``k`` (works for one more release, with a DeprecationWarning).

    Returns:
        ``(out [B, C, Dv]`` in ``values``' dtype, ``indices [B, C, k]`` int64 nearest first``)``.

    Non-finite values (the same rule in every backend, checked without a host sync): a NaN distance
    counts as ``+inf``, and a key at ``+inf`` distance is no match. A pick that finds no match has
    index ``-1`` and makes its output row NaN, with no gradient; so a query row holding NaN gets
    ``indices == -1`` and a NaN output instead of an arbitrary key.

    Example:
        >>> import torch
        >>> from memlayers.ops.dkvb import dkvb_lookup
        >>> q, keys = torch.randn(8, 4, 14), torch.randn(4, 256, 14)
        >>> values = torch.randn(4, 256, 10, requires_grad=True)
        >>> out, idx = dkvb_lookup(q, keys, values, k=2)
        >>> out.shape, idx.shape
        (torch.Size([8, 4, 10]), torch.Size([8, 4, 2]))
    """
    check_tensor("queries", queries, ndim=3, dtypes=FLOAT_DTYPES)
    B, C, Dk = queries.shape
    check_tensor("keys", keys, shape=(C, None, Dk), dtypes=(queries.dtype,))
    N = keys.shape[1]
    check_tensor("values", values, shape=(C, N, None), dtypes=FLOAT_DTYPES)
    check_same_device(queries=queries, keys=keys, values=values)
    k = renamed_argument("dkvb_lookup", "topk", topk, "k", k, 1)
    check_positive_int("k", k)
    if k > N:
        raise ValueError(f"k must be <= the number of keys per codebook ({N}), got {k}")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, shape=(C, N), dtypes=(torch.bool,))
        check_same_device(queries=queries, key_mask=key_mask)
        fewest = int(key_mask.sum(dim=1).min()) if C > 0 else k
        if fewest < k:
            raise ValueError(f"key_mask must leave at least k={k} keys in every codebook, got {fewest}")

    if resolve_backend(backend, queries, keys, values, op="dkvb_lookup") == "triton":
        return load_triton_module("dkvb").dkvb_lookup_triton(queries, keys, values, k, key_mask, deterministic)
    return dkvb_lookup_naive(queries, keys, values, k, key_mask)


__all__ = ["dkvb_lookup", "dkvb_lookup_naive", "dkvb_distances"]
