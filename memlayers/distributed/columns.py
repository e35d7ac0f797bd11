"""A value table sharded by embedding columns over a process group: the product-key memory read.

Layout (as in "Memory Layers at Scale", Berges et al. 2024): every rank holds all ``N`` rows of the
table but only its block of the ``Dv`` embedding columns (``column_widths``: the first ``Dv % W``
ranks hold one column more). The ranks run data parallel, each on its own tokens, and address the
table themselves (the keys are replicated). One read:

1. all-gather every rank's ``(indices, weights)`` (the only data that crosses ranks on the way in);
2. each rank computes the weighted bag of *every* rank's tokens over its own columns;
3. one all-to-all hands each rank its tokens' column blocks: ``[T_r, Dv]``, exactly what the unsharded
   table gives, column by column the same arithmetic.

Backward runs the same way in reverse: the all-to-all returns each rank's output gradient to the
column owners, each owner accumulates the gradient of its column block for all tokens (no
communication), and the weights' gradients, partial sums over column blocks, are summed across ranks.
The shard's gradient is the group's *average* of the ranks' gradients, as DDP/FSDP average every
replicated parameter, so a sharded layer in a data-parallel model trains as an unsharded one.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist

from ..ops.embedding_bag import weighted_embedding_bag


def column_widths(value_dim: int, world: int) -> List[int]:
    """Columns held by each of ``world`` ranks (``torch.tensor_split``'s split: the first ranks one more)."""
    if value_dim < world:
        raise ValueError(f"value_dim ({value_dim}) must be at least the process group's size ({world}): "
                         "the table is sharded by columns")
    return [value_dim // world + (1 if r < value_dim % world else 0) for r in range(world)]


def column_range(value_dim: int, world: int, rank: int) -> Tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s columns."""
    widths = column_widths(value_dim, world)
    start = sum(widths[:rank])
    return start, start + widths[rank]


def token_counts(tokens: int, group, device) -> List[int]:
    """Every rank's token count (one small all-gather and a host read: the counts may differ). The
    tensors live on ``device``, the data's, which the group's backend (NCCL: CUDA) must accept."""
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([tokens], device=device), group=group)
    return [int(c) for c in counts]


class _GatherTokens(torch.autograd.Function):
    """Every rank's ``[T_r, K]`` weights and indices, concatenated in rank order: ``[sum T_r, K]``."""

    @staticmethod
    def forward(ctx, weights, indices, counts, group):
        top = max(counts)

        def gathered(x):
            padded = x.new_zeros(top, x.shape[1])
            padded[: x.shape[0]] = x
            out = [torch.empty_like(padded) for _ in counts]
            dist.all_gather(out, padded, group=group)
            return torch.cat([o[:c] for o, c in zip(out, counts)])

        ctx.group, ctx.counts, ctx.rank = group, counts, dist.get_rank(group)
        all_indices = gathered(indices)
        ctx.mark_non_differentiable(all_indices)
        return gathered(weights), all_indices

    @staticmethod
    def backward(ctx, grad_weights, grad_indices):
        counts, rank = ctx.counts, ctx.rank
        # Each rank holds its column block's partial sums for every token: add them up across ranks (fp32).
        wide = grad_weights.new_zeros(len(counts), max(counts), grad_weights.shape[1], dtype=torch.float32)
        for r, part in enumerate(grad_weights.split(counts)):
            wide[r, : counts[r]] = part
        dist.all_reduce(wide, group=ctx.group)
        return wide[rank, : counts[rank]].to(grad_weights.dtype), None, None, None


def _exchange(blocks: List[torch.Tensor], out_shapes: List[Tuple[int, int]], group) -> List[torch.Tensor]:
    """All-to-all: ``blocks[s]`` goes to rank ``s``; returns what each rank sent here, as ``out_shapes``."""
    send = torch.cat([b.reshape(-1) for b in blocks])
    recv_sizes = [a * b for a, b in out_shapes]
    recv = send.new_empty(sum(recv_sizes))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes,
                           input_split_sizes=[b.numel() for b in blocks], group=group)
    return [part.view(shape) for part, shape in zip(recv.split(recv_sizes), out_shapes)]


class _ExchangeColumns(torch.autograd.Function):
    """``[sum T_s, w_r]`` (my columns, every rank's tokens) -> ``[T_r, Dv]`` (my tokens, every column)."""

    @staticmethod
    def forward(ctx, local, counts, widths, group):
        rank = dist.get_rank(group)
        ctx.counts, ctx.widths, ctx.group, ctx.rank = counts, widths, group, rank
        parts = _exchange(list(local.split(counts)), [(counts[rank], w) for w in widths], group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        counts, widths, rank = ctx.counts, ctx.widths, ctx.rank
        blocks = [g.contiguous() for g in grad.split(widths, dim=1)]
        parts = _exchange(blocks, [(c, widths[rank]) for c in counts], ctx.group)
        return torch.cat(parts, dim=0), None, None, None


class _AverageGrad(torch.autograd.Function):
    """Identity forward; the gradient divided by the group's size (the data-parallel average)."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.world, None


def sharded_bag(shard: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, value_dim: int, group,
                backend: str = "auto") -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * table[indices[t, j]]`` for a table sharded by columns.

    Args:
        shard: ``[N, w_r]``, this rank's columns of the ``[N, value_dim]`` table (``column_range``).
        indices: ``[T_r, K]`` rows of the table, in range (not checked); T_r may differ across ranks.
        weights: ``[T_r, K]``, ``shard``'s dtype.
        value_dim: the table's full width.
        group: the process group the table is sharded over; every rank must call together.
        backend: of the local ``weighted_embedding_bag``.

    Returns:
        ``[T_r, value_dim]``, this rank's tokens read from the whole table. Gradients flow to ``weights``
        (exact sums over the column blocks) and to ``shard`` (the group's average, see the module docstring).
    """
    world = dist.get_world_size(group)
    widths = column_widths(value_dim, world)
    if shard.shape[1] != widths[dist.get_rank(group)]:
        raise ValueError(f"shard must hold {widths[dist.get_rank(group)]} columns on rank {dist.get_rank(group)}, "
                         f"got shape {tuple(shard.shape)}")
    counts = token_counts(weights.shape[0], group, weights.device)
    all_weights, all_indices = _GatherTokens.apply(weights, indices, counts, group)
    local = weighted_embedding_bag(_AverageGrad.apply(shard, world), all_indices, all_weights,
                                   backend=backend, check_indices=False)
    return _ExchangeColumns.apply(local, counts, widths, group)


def gather_columns(shard: torch.Tensor, value_dim: int, group) -> torch.Tensor:
    """The whole ``[N, value_dim]`` table from every rank's ``[N, w_r]`` shard (an all-gather)."""
    widths = column_widths(value_dim, dist.get_world_size(group))
    padded = shard.new_zeros(shard.shape[0], max(widths))
    padded[:, : shard.shape[1]] = shard
    parts = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:, :w] for p, w in zip(parts, widths)], dim=1)


__all__ = ["column_range", "column_widths", "gather_columns", "sharded_bag"]
