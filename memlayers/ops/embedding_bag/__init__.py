"""``weighted_embedding_bag``: fused weighted gather-sum of table rows (the product-key memory read)."""
from __future__ import annotations

import torch

from ..utils import FLOAT_DTYPES, check_same_device, check_tensor, empty_result, load_triton_module, resolve_backend
from .naive import weighted_embedding_bag_naive


def check_indices_in_range(name: str, indices: torch.Tensor, size: int) -> None:
    """Out-of-range rows would read or write outside the table in the kernel: reject them."""
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{name} must lie in [0, {size}), got values in [{lo}, {hi}]")


def weighted_embedding_bag(
    weight: torch.Tensor,
    indices: torch.Tensor,
    per_sample_weights: torch.Tensor,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Weighted sum of gathered rows: ``out[t] = sum_j per_sample_weights[t, j] * weight[indices[t, j]]``.

    Equal to ``F.embedding_bag(indices, weight, per_sample_weights=per_sample_weights, mode="sum")``,
    without materializing ``[T, K, D]``; accumulation is fp32 whatever the dtype. The Triton backward
    groups the lookups by table row (a stable sort and a segment reduction: deterministic, no atomics,
    only rows that were hit are written) and computes the gradient of ``per_sample_weights`` only when
    it requires grad.

    Args:
        weight: ``[V, D]`` table, fp32/fp16/bf16.
        indices: ``[T, K]`` int64 (or int32) rows of ``weight``, each in ``[0, V)``; T = 0 or K = 0
            gives ``T`` zero rows (gradients: zeros).
        per_sample_weights: ``[T, K]`` weights, same dtype as ``weight``.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"torch"`` or ``"triton"``.
        check_indices: verify ``0 <= indices < V`` (one reduction; callers that build indices
            themselves may skip it).

    Returns:
        ``out``: ``[T, D]`` in ``weight``'s dtype.

    Example:
        >>> import torch
        >>> from memlayers.ops.embedding_bag import weighted_embedding_bag
        >>> table = torch.randn(1000, 64, requires_grad=True)
        >>> idx, w = torch.randint(0, 1000, (5, 8)), torch.rand(5, 8)
        >>> weighted_embedding_bag(table, idx, w).shape
        torch.Size([5, 64])
    """
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("indices", indices, ndim=2, dtypes=(torch.int64, torch.int32))
    check_tensor("per_sample_weights", per_sample_weights, shape=tuple(indices.shape), dtypes=(weight.dtype,))
    check_same_device(weight=weight, indices=indices, per_sample_weights=per_sample_weights)
    if check_indices:
        check_indices_in_range("indices", indices, weight.shape[0])

    chosen = resolve_backend(backend, weight, indices, per_sample_weights, op="weighted_embedding_bag")
    if indices.numel() == 0:  # no token or no lookup: every row sums nothing
        return empty_result((indices.shape[0], weight.shape[1]), 0.0, weight.dtype, weight.device,
                            weight, per_sample_weights)
    if chosen == "triton":
        return load_triton_module("embedding_bag").weighted_embedding_bag_triton(weight, indices, per_sample_weights)
    return weighted_embedding_bag_naive(weight, indices.long(), per_sample_weights)


__all__ = ["weighted_embedding_bag", "weighted_embedding_bag_naive", "check_indices_in_range"]
