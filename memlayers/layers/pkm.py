"""Product-key memory (Lample et al., 2019) with the Memory+ options of "Memory Layers at Scale".

A query is split in two halves; each half is scored against its own set of ``n`` half-keys, the
top-k of each side are combined (k x k candidates, the sum of the two half scores), and the best k
of those address a table of ``n * n`` values. The output is the softmax-weighted sum of those value
rows, summed over heads: a fused weighted embedding bag, whose backward touches only the rows hit.

Memory+ switches: ``shared_values`` (one value table for several memory layers), ``gated`` (SiLU
gate from the input, then an output projection), ``qk_norm`` (unit-norm queries and half-keys).

``process_group`` shards the value table by embedding columns over the group's ranks, which run data
parallel (``memlayers/distributed/columns.py``): outputs and gradients equal the unsharded layer's.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed.columns import column_range, gather_columns, sharded_bag
from ..ops.embedding_bag import weighted_embedding_bag
from .learned_memory import LearnedMemory
from .names import renamed, warn_renamed
from ..ops.utils import FLOAT_DTYPES, check_positive_int, check_tensor


class ProductKeyMemory(nn.Module, LearnedMemory):
    """Product-key memory layer: ``x [..., dim] -> [..., dim]`` (or ``[..., value_dim]``).

    Args:
        dim: input (and output) size.
        heads: independent query heads; their reads are summed.
        num_keys: ``n``, half-keys per side; the memory holds ``n * n`` values.
        top_k: values read per head (and half-keys kept per side), ``<= n``.
        value_dim: size of a value row; defaults to ``dim``.
        key_dim: size of a full query/key (two halves); even, defaults to ``min(dim, 256)`` rounded down to even.
        shared_values: a ``[n * n, value_dim]`` ``nn.Parameter`` or another ``ProductKeyMemory``
            whose values this layer reads (Memory+ shares one table across layers).
        gated: Memory+ output ``out_proj(read * silu(gate(x)))``.
        qk_norm: L2-normalize queries and half-keys before scoring (Memory+).
        out_proj: project the read to ``dim``; defaults to True when gated or ``value_dim != dim``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the weighted gather.
        process_group: a ``torch.distributed`` group to shard the value table over, by embedding
            columns: rank r holds ``values [n * n, w_r]``, its columns ``value_columns`` of the table
            (the first ``value_dim % W`` ranks one column more). The ranks run data parallel, each on
            its own tokens (every rank must call forward and backward together); each gets exactly
            the unsharded layer's output for its tokens, and the shard's gradient is the group's
            average, as DDP/FSDP average the replicated parameters (``query``, ``keys``, ...). The
            shard is per rank: ``memlayers.distributed.prepare_ddp`` keeps DDP off it, and
            ``memlayers.distributed.state_dict`` checkpoints it per rank. ``load_state_dict`` takes
            this rank's shard or the whole ``[n * n, value_dim]`` table (it keeps its own columns);
            ``full_values()`` gathers the whole table (to reshard onto another number of ranks).

    Example:
        >>> import torch, memlayers as ml
        >>> pkm = ml.ProductKeyMemory(dim=64, heads=2, num_keys=32, top_k=8)
        >>> pkm(torch.randn(2, 10, 64)).shape
        torch.Size([2, 10, 64])
    """

    def __init__(
        self,
        dim: int,
        heads: int = 4,
        num_keys: int = 512,
        top_k: int = 32,
        value_dim: Optional[int] = None,
        key_dim: Optional[int] = None,
        shared_values: Optional[Union[nn.Parameter, "ProductKeyMemory"]] = None,
        gated: bool = False,
        qk_norm: bool = False,
        out_proj: Optional[bool] = None,
        backend: str = "auto",
        topk: Optional[int] = None,
        process_group=None,
    ):
        super().__init__()
        top_k = renamed(type(self).__name__, "topk", topk, "top_k", top_k, 32)
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_positive_int("num_keys", num_keys, minimum=2)
        check_positive_int("top_k", top_k)
        if top_k > num_keys:
            raise ValueError(f"top_k must be <= num_keys ({num_keys}), got {top_k}")
        value_dim = dim if value_dim is None else check_positive_int("value_dim", value_dim)
        key_dim = max(2, min(dim, 256) // 2 * 2) if key_dim is None else check_positive_int("key_dim", key_dim, minimum=2)
        if key_dim % 2:
            raise ValueError(f"key_dim must be even (two halves), got {key_dim}")

        self.dim, self.heads, self.num_keys, self.top_k = dim, heads, num_keys, top_k
        self.value_dim, self.key_dim, self.gated, self.qk_norm, self.backend = value_dim, key_dim, gated, qk_norm, backend
        self.num_values = num_keys * num_keys
        self.process_group = process_group
        if process_group is None:
            self.value_columns = (0, value_dim)
        else:  # checks value_dim against the group's size
            import torch.distributed as dist

            self.value_columns = column_range(value_dim, dist.get_world_size(process_group), dist.get_rank(process_group))
        columns = self.value_columns[1] - self.value_columns[0]

        self.query = nn.Linear(dim, heads * key_dim, bias=False)
        half = key_dim // 2
        # keys[h, side, i]: half-key i of side 0 (first query half) or 1 (second half) for head h.
        self.keys = nn.Parameter(torch.empty(heads, 2, num_keys, half).uniform_(-1 / math.sqrt(half), 1 / math.sqrt(half)))
        if shared_values is None:
            self.values = nn.Parameter(_draw_columns(self.num_values, value_dim, self.value_columns))
        else:
            shared = shared_values.values if isinstance(shared_values, ProductKeyMemory) else shared_values
            if not isinstance(shared, nn.Parameter):
                raise TypeError(f"shared_values must be an nn.Parameter or a ProductKeyMemory, got {type(shared_values).__name__}")
            if isinstance(shared_values, ProductKeyMemory) and shared_values.process_group is not process_group:
                raise ValueError("shared_values must be sharded over the same process_group as this layer "
                                 f"(it has {shared_values.process_group!r}, this layer {process_group!r})")
            check_tensor("shared_values", shared, shape=(self.num_values, columns), dtypes=FLOAT_DTYPES)
            self.values = shared  # the same Parameter object: model.parameters() lists it once
        self.gate = nn.Linear(dim, value_dim, bias=False) if gated else None
        if out_proj is None:
            out_proj = gated or value_dim != dim
        self.out_proj = nn.Linear(value_dim, dim, bias=False) if out_proj else None

    def address(self, x: torch.Tensor):
        """x ``[T, dim]`` -> ``(indices [T, heads, top_k]`` into the values, ``weights [T, heads, top_k])``."""
        T = x.shape[0]
        H, n, k, half = self.heads, self.num_keys, self.top_k, self.key_dim // 2
        q = self.query(x).view(T, H, 2, half)
        keys = self.keys
        if self.qk_norm:
            q, keys = F.normalize(q, dim=-1), F.normalize(keys, dim=-1)
        scores = torch.einsum("thsd,hsnd->thsn", q, keys.to(q.dtype))  # [T, H, 2, n]
        side_scores, side_idx = scores.topk(k, dim=-1)  # [T, H, 2, k]
        # All k x k pairs of one half-key from each side; a pair's score is the sum of its halves'.
        pair = side_scores[:, :, 0, :, None] + side_scores[:, :, 1, None, :]  # [T, H, k, k]
        best, flat = pair.reshape(T, H, k * k).topk(k, dim=-1)
        first = side_idx[:, :, 0].gather(-1, flat // k)
        second = side_idx[:, :, 1].gather(-1, flat % k)
        return first * n + second, torch.softmax(best.float(), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., dim]`` -> ``[..., dim]`` (``[..., value_dim]`` when there is no output projection)."""
        check_tensor("x", x, dtypes=FLOAT_DTYPES, device=self.values.device)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        indices, weights = self.address(flat)
        T = flat.shape[0]
        indices = indices.reshape(T, self.heads * self.top_k)
        weights = weights.reshape(T, self.heads * self.top_k).to(self.values.dtype)
        if self.process_group is not None:
            read = sharded_bag(self.values, indices, weights, self.value_dim, self.process_group, self.backend)
        else:
            read = weighted_embedding_bag(self.values, indices, weights, backend=self.backend,
                                          check_indices=False)  # built here, always in range
        if self.gate is not None:
            read = read * F.silu(self.gate(flat)).to(read.dtype)
        if self.out_proj is not None:
            read = self.out_proj(read.to(self.out_proj.weight.dtype))
        return read.reshape(*lead, read.shape[-1])

    @torch.no_grad()
    def full_values(self) -> torch.Tensor:
        """The whole ``[n * n, value_dim]`` table (a sharded layer gathers its group's columns: every rank
        calls), e.g. to save an unsharded checkpoint or to reshard onto another number of ranks."""
        if self.process_group is None:
            return self.values.detach().clone()
        return gather_columns(self.values.detach(), self.value_dim, self.process_group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A sharded layer takes the whole table too, keeping its own columns.
        full = state_dict.get(prefix + "values")
        if (self.process_group is not None and isinstance(full, torch.Tensor)
                and tuple(full.shape) == (self.num_values, self.value_dim) != tuple(self.values.shape)):
            start, stop = self.value_columns
            state_dict = {**state_dict, prefix + "values": full[:, start:stop]}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def topk(self) -> int:
        """Deprecated spelling of ``top_k``."""
        warn_renamed(type(self).__name__, "topk", "top_k", stacklevel=2)
        return self.top_k

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, heads={self.heads}, num_keys={self.num_keys} (values {self.num_values}), top_k={self.top_k}, "
            f"value_dim={self.value_dim}, key_dim={self.key_dim}, gated={self.gated}, qk_norm={self.qk_norm}"
            + ("" if self.process_group is None else f", value_columns={self.value_columns}")
        )


def _draw_columns(rows: int, value_dim: int, columns, block: int = 4096) -> torch.Tensor:
    """``columns`` of a ``[rows, value_dim]`` N(0, 1/value_dim) table, drawn ``block`` rows at a time, so
    that the ranks of a sharded table hold different columns of one draw without holding all of it."""
    start, stop = columns
    if (start, stop) == (0, value_dim):
        return torch.randn(rows, value_dim) / math.sqrt(value_dim)
    out = torch.empty(rows, stop - start)
    for lo in range(0, rows, block):
        hi = min(rows, lo + block)
        out[lo:hi] = torch.randn(hi - lo, value_dim)[:, start:stop]
    return out / math.sqrt(value_dim)


__all__ = ["ProductKeyMemory"]
