"""Exact unlearning: the ledger of which memory slots each group's training wrote, and their values before.

Sparse memory fine-tuning (``SparseMemoryFinetuning``) gives each group of training sequences (a
fact, or a batch) slots of its own: no two groups ever write the same slot. The ledger keeps, per
group, the slots its training changed and their values before the first change. Forgetting a set
of groups writes those values back: every other slot, and every other parameter, stays bit for bit.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn


class SlotLedger:
    """Per group: ``[(memory index, rows [n], values before [n, value_dim]), ...]`` in write order.

    ``branches`` are the ``PKMBranch`` modules whose value tables the groups write, in the order the
    memory indices refer to.
    """

    def __init__(self, branches: Sequence[nn.Module]):
        if not branches:
            raise ValueError("branches must hold at least one PKMBranch")
        self.branches = list(branches)
        self.entries: Dict[int, List[Tuple[int, torch.Tensor, torch.Tensor]]] = {}

    @property
    def groups(self) -> List[int]:
        return sorted(self.entries)

    def owned(self) -> torch.Tensor:
        """``[M, V]`` bool: the slots some recorded group wrote."""
        values = self.branches[0].pkm.values
        mask = torch.zeros(len(self.branches), values.shape[0], dtype=torch.bool, device=values.device)
        for records in self.entries.values():
            for m, rows, _ in records:
                mask[m, rows] = True
        return mask

    def slots(self, group: int) -> Dict[int, torch.Tensor]:
        """``{memory index: rows}`` that ``group``'s training wrote."""
        self._check_groups([group])
        out: Dict[int, List[torch.Tensor]] = {}
        for m, rows, _ in self.entries[group]:
            out.setdefault(m, []).append(rows)
        return {m: torch.cat(r) for m, r in out.items()}

    def record(self, group: int, memory: int, rows: torch.Tensor, before: torch.Tensor) -> None:
        """Note that ``group`` wrote ``rows`` of memory ``memory``, which held ``before`` until then.
        The rows must belong to no group yet (that is what makes forgetting exact)."""
        if isinstance(group, bool) or not isinstance(group, int):
            raise TypeError(f"group must be an int, got {type(group).__name__}")
        if not 0 <= memory < len(self.branches):
            raise ValueError(f"memory must lie in [0, {len(self.branches)}), got {memory}")
        if rows.dim() != 1 or before.shape != (rows.shape[0], self.branches[memory].pkm.values.shape[1]):
            raise ValueError(f"rows [n] and before [n, value_dim] expected, got {tuple(rows.shape)} and {tuple(before.shape)}")
        if bool(self.owned()[memory, rows].any()):
            raise ValueError(f"rows of memory {memory} already belong to another group; forget it first")
        if rows.numel():
            self.entries.setdefault(group, []).append((memory, rows.clone(), before.detach().clone()))

    def _check_groups(self, groups: Iterable[int]) -> List[int]:
        groups = list(groups)
        unknown = [g for g in groups if g not in self.entries]
        if unknown:
            raise ValueError(f"groups {unknown} wrote no slot (known groups: {self.groups})")
        return groups

    @torch.no_grad()
    def forget(self, groups: Iterable[int]) -> int:
        """Write back the values the slots of ``groups`` held before their training; returns how
        many slots were reset. All groups are checked before anything changes."""
        groups = self._check_groups(groups)
        reset = 0
        for g in dict.fromkeys(groups):
            for m, rows, before in reversed(self.entries.pop(g)):
                values = self.branches[m].pkm.values
                values[rows.to(values.device)] = before.to(device=values.device, dtype=values.dtype)
                reset += rows.numel()
        return reset


__all__ = ["SlotLedger"]
