"""Weighted embedding bag in plain PyTorch: the specification of the Triton kernel and the CPU path.

    out[t, :] = sum_j per_sample_weights[t, j] * weight[indices[t, j], :]

computed in fp32 and returned in ``weight``'s dtype. Gradients: ``weight`` receives the scatter-add of
``per_sample_weights[t, j] * grad_out[t]`` into row ``indices[t, j]``; ``per_sample_weights[t, j]``
receives ``grad_out[t] . weight[indices[t, j]]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_embedding_bag_naive(weight: torch.Tensor, indices: torch.Tensor, per_sample_weights: torch.Tensor) -> torch.Tensor:
    """weight [V, D], indices [T, K] int64, per_sample_weights [T, K] -> out [T, D] (weight's dtype)."""
    # F.embedding_bag in "sum" mode never materializes [T, K, D]; upcasting keeps the fp32 contract.
    out = F.embedding_bag(
        indices, weight.float(), per_sample_weights=per_sample_weights.float(), mode="sum"
    )
    return out.to(weight.dtype)
