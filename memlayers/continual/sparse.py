"""Sparse memory fine-tuning (Lin et al. 2025, arXiv 2510.15103) of product-key memory branches.

Only the slots that the new data reads far more than background data does are trained: per group
of training sequences (one fact's paraphrases, or a whole batch), the ``slots_per_group`` slots of
highest TF-IDF against the background statistics, excluding slots another group already wrote.

The trained rows live outside the value table, in a :class:`TrainableSlots` module per memory
(``delta [t, value_dim]``, zero at the start): the branch reads ``values[i] + delta[pos(i)]`` for a
trained slot ``i``. The gradient is ``[t, value_dim]`` (never a dense ``[V, value_dim]`` gradient of the
table) and an optimizer built on ``parameters()`` keeps state for those ``t`` rows only. A token
of group ``g`` writes only the slots ``g`` owns, so groups never share a written slot and
:class:`~memlayers.continual.unlearn.SlotLedger` can forget any of them exactly. ``end()`` adds
the deltas into the table and records, per group, the rows that changed and their old values.

    >>> ft = SparseMemoryFinetuning(branches, background, slots_per_group=64)
    >>> ft.begin(model, ids, mask, groups)               # TF-IDF selection, trainable rows installed
    >>> opt = torch.optim.Adam(ft.parameters(), lr=1e-2)
    >>> with ft.token_groups(groups, mask):
    ...     model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    >>> opt.step(); ft.end()                              # written into the table, ledger updated
    >>> ft.ledger.forget([3])                             # fact 3's slots back to their old values
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import nn

from ..ops.embedding_bag import weighted_embedding_bag
from ..ops.utils import check_positive_int, check_tensor
from .stats import SlotStats, group_slot_stats, tfidf
from .unlearn import SlotLedger


class TrainableSlots(nn.Module):
    """The trained rows of one memory: ``read(indices, weights) = sum_j w_j * delta[pos(i_j)]`` over the
    lookups of trained slots (owned by the token's group when ``groups`` is set).

    Args:
        num_slots: ``V``, slots in the memory.
        rows: ``[t]`` distinct slots to train.
        owners: ``[t]`` the group owning each row.
        value_dim: width of a row.
        backend: the fused gather's backend.
    """

    def __init__(self, num_slots: int, rows: torch.Tensor, owners: torch.Tensor, value_dim: int, *,
                 dtype=torch.float32, backend: str = "auto"):
        super().__init__()
        check_tensor("rows", rows, ndim=1, dtypes=(torch.int64,))
        check_tensor("owners", owners, shape=tuple(rows.shape), dtypes=(torch.int64,), device=rows.device)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= num_slots):
            raise ValueError(f"rows must lie in [0, {num_slots})")
        if rows.unique().numel() != rows.numel():
            raise ValueError("rows must be distinct")
        position = torch.full((num_slots,), -1, dtype=torch.int64, device=rows.device)
        position[rows] = torch.arange(rows.numel(), device=rows.device)
        self.register_buffer("rows", rows.clone())
        self.register_buffer("owners", owners.clone())
        self.register_buffer("position", position)
        # At least one row so that the gather always has a table; an unused row never moves.
        self.delta = nn.Parameter(torch.zeros(max(rows.numel(), 1), value_dim, dtype=dtype, device=rows.device))
        self.backend = backend
        self.groups: Optional[torch.Tensor] = None  # [N] group of each token read (-1: writes nothing)

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices ``[N, K]`` slots read, weights ``[N, K]`` -> ``[N, value_dim]``."""
        pos = self.position[indices]
        keep = pos >= 0
        if self.groups is not None:
            if self.groups.shape[0] != indices.shape[0]:
                raise ValueError(f"token groups cover {self.groups.shape[0]} tokens, the forward reads {indices.shape[0]}")
            keep &= self.owners[pos.clamp(min=0)] == self.groups[:, None]
        w = torch.where(keep, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
        return weighted_embedding_bag(self.delta, pos.clamp(min=0), w.to(self.delta.dtype), backend=self.backend,
                                      check_indices=False)


class SparseMemoryFinetuning:
    """Select, train and write back the slots of ``branches`` (``PKMBranch`` modules) group by group.

    Args:
        branches: the memories, all with the same slot count.
        background: their ``SlotStats`` over a background corpus (the IDF side of TF-IDF).
        slots_per_group: ``t``, trained slots per group (fewer when a group reads fewer free slots).
        ledger: where written slots are recorded (a new ``SlotLedger`` when None).
    """

    def __init__(self, branches: Sequence[nn.Module], background: SlotStats, slots_per_group: int,
                 ledger: Optional[SlotLedger] = None):
        if not branches:
            raise ValueError("branches must hold at least one PKMBranch")
        if not isinstance(background, SlotStats):
            raise TypeError(f"background must be a SlotStats, got {type(background).__name__}")
        if background.shape != (len(branches), branches[0].num_slots):
            raise ValueError(f"background must have shape {(len(branches), branches[0].num_slots)}, got {background.shape}")
        self.branches = list(branches)
        self.background = background
        self.slots_per_group = check_positive_int("slots_per_group", slots_per_group)
        self.ledger = SlotLedger(self.branches) if ledger is None else ledger
        self._before: List[torch.Tensor] = []

    @property
    def active(self) -> bool:
        return any(b.trainable is not None for b in self.branches)

    def select(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               groups: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Per group (``groups [B]``, one per sequence), the ``[n, 2]`` (memory, slot) pairs of highest
        TF-IDF it reads, at most ``slots_per_group``, none owned by another group."""
        stats = group_slot_stats(model, self.branches, input_ids, attention_mask, groups)
        taken = self.ledger.owned()
        V = taken.shape[1]
        chosen = {}
        for g, s in stats.items():
            score = tfidf(s, self.background).to(taken.device)
            score = torch.where(taken | (s.counts.to(taken.device) == 0), torch.full_like(score, -1.0), score)
            top = score.reshape(-1).topk(min(self.slots_per_group, score.numel()))
            flat = top.indices[top.values >= 0]
            taken.view(-1)[flat] = True
            chosen[g] = torch.stack([flat // V, flat % V], dim=1)
        return chosen

    def begin(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              groups: torch.Tensor) -> Dict[int, torch.Tensor]:
        """Select the slots of each group in this batch (``select``) and install their trainable rows;
        returns the selection. ``parameters()`` then lists the rows to optimize."""
        if self.active:
            raise ValueError("a sparse fine-tuning phase is in progress; call end() first")
        chosen = self.select(model, input_ids, attention_mask, groups)
        for m, branch in enumerate(self.branches):
            rows, owners = [], []
            for g, pairs in chosen.items():
                mine = pairs[pairs[:, 0] == m, 1]
                rows.append(mine)
                owners.append(torch.full_like(mine, g))
            values = branch.pkm.values
            rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64, device=values.device)
            owners = torch.cat(owners) if owners else torch.zeros_like(rows)
            branch.trainable = TrainableSlots(branch.num_slots, rows.to(values.device), owners.to(values.device),
                                              values.shape[1], dtype=values.dtype, backend=branch.pkm.backend)
        return chosen

    def parameters(self) -> List[nn.Parameter]:
        """The trainable rows of the phase in progress (one ``[t_m, value_dim]`` tensor per memory)."""
        return [b.trainable.delta for b in self.branches if b.trainable is not None]

    @contextmanager
    def token_groups(self, groups: torch.Tensor, attention_mask: torch.Tensor) -> Iterator[None]:
        """Within the block, a token of sequence ``b`` writes only slots owned by ``groups[b]``
        (padding writes nothing). Without it every token writes every trained slot."""
        check_tensor("attention_mask", attention_mask, ndim=2)
        check_tensor("groups", groups, shape=(attention_mask.shape[0],), dtypes=(torch.int64, torch.int32))
        per_token = torch.where(attention_mask.bool(), groups.long()[:, None].to(attention_mask.device),
                                torch.full_like(attention_mask, -1, dtype=torch.int64)).reshape(-1)
        trainables = [b.trainable for b in self.branches if b.trainable is not None]
        for t in trainables:
            t.groups = per_token.to(t.rows.device)
        try:
            yield
        finally:
            for t in trainables:
                t.groups = None

    @torch.no_grad()
    def end(self) -> int:
        """Add the trained rows into the value tables, record per group the rows that changed (and
        their old values) in the ledger, remove the trainable rows. Returns the rows written."""
        if not self.active:
            raise ValueError("no sparse fine-tuning phase is in progress; call begin() first")
        written = 0
        for m, branch in enumerate(self.branches):
            t = branch.trainable
            branch.trainable = None
            n = t.rows.numel()
            delta = t.delta[:n]
            changed = (delta != 0).any(dim=1)
            values = branch.pkm.values
            rows, owners = t.rows[changed], t.owners[changed]
            before = values[rows].clone()
            values[rows] = before + delta[changed].to(values.dtype)
            for g in owners.unique().tolist():
                mine = owners == g
                self.ledger.record(int(g), m, rows[mine], before[mine])
            written += rows.numel()
        return written


__all__ = ["TrainableSlots", "SparseMemoryFinetuning"]
