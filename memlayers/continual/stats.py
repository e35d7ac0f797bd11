"""Slot access statistics of product-key memories, and TF-IDF slot scores against a background corpus.

A model with ``M`` attached ``PKMBranch`` memories of ``V`` slots each reads, for every token,
``heads * top_k`` slots per memory. :class:`SlotStats` accumulates, on the memories' device:

- ``counts [M, V]``: how many lookups read each slot (term frequency);
- ``docs [M, V]``: in how many sequences each slot was read at least once (document frequency);
- ``num_docs``: how many sequences were seen.

Sparse memory fine-tuning (Lin et al. 2025, arXiv 2510.15103) trains the slots that new data reads
far more than background data does: ``tfidf = counts / counts.sum() * log((N_bg + 1) / (docs_bg + 1))``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..ops.utils import check_positive_int, check_tensor


class SlotStats:
    """Per-slot access counts of ``num_memories`` memories of ``num_slots`` slots, on ``device``."""

    def __init__(self, num_memories: int, num_slots: int, device=None):
        check_positive_int("num_memories", num_memories)
        check_positive_int("num_slots", num_slots)
        self.counts = torch.zeros(num_memories, num_slots, dtype=torch.int64, device=device)
        self.docs = torch.zeros(num_memories, num_slots, dtype=torch.int64, device=device)
        self.num_docs = 0

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.counts.shape)

    def update(self, indices: Sequence[torch.Tensor], valid: torch.Tensor) -> None:
        """Count one batch of sequences.

        Args:
            indices: one tensor per memory, ``[B, L, K]`` slots read by each token (``K = heads * top_k``).
            valid: ``[B, L]`` bool, the tokens to count (padding excluded). Sequences without a
                valid token are not documents.
        """
        M, V = self.shape
        if len(indices) != M:
            raise ValueError(f"indices must hold one tensor per memory ({M}), got {len(indices)}")
        check_tensor("valid", valid, ndim=2, dtypes=(torch.bool,), device=self.counts.device)
        B, L = valid.shape
        for m, idx in enumerate(indices):
            check_tensor(f"indices[{m}]", idx, shape=(B, L, None), dtypes=(torch.int64, torch.int32), device=self.counts.device)
            idx = idx.long()
            hits = valid[:, :, None].expand_as(idx).to(torch.int64)
            self.counts[m].index_add_(0, idx.reshape(-1), hits.reshape(-1))
            per_doc = torch.zeros(B, V, dtype=torch.int64, device=idx.device)
            per_doc.scatter_add_(1, idx.reshape(B, -1), hits.reshape(B, -1))
            self.docs[m] += (per_doc > 0).sum(0)
        self.num_docs += int(valid.any(dim=1).sum())

    def merge_(self, other: "SlotStats") -> "SlotStats":
        """Add ``other``'s counts into these (same shape); returns self."""
        if other.shape != self.shape:
            raise ValueError(f"other must have shape {self.shape}, got {other.shape}")
        self.counts += other.counts.to(self.counts.device)
        self.docs += other.docs.to(self.docs.device)
        self.num_docs += other.num_docs
        return self


def tfidf(stats: SlotStats, background: SlotStats) -> torch.Tensor:
    """``[M, V]`` float32 TF-IDF of each slot: its share of ``stats``' lookups times the log inverse
    share of background sequences that read it (add-one smoothed). Slots ``stats`` never read score 0."""
    if stats.shape != background.shape:
        raise ValueError(f"background must have shape {stats.shape}, got {background.shape}")
    tf = stats.counts.double() / max(int(stats.counts.sum()), 1)
    idf = torch.log((background.num_docs + 1.0) / (background.docs.double().to(tf.device) + 1.0))
    return (tf * idf).float()


@contextmanager
def recording(branches: Sequence[nn.Module]) -> Iterator[List[List[torch.Tensor]]]:
    """Within the block, every forward of the branches appends the ``[N, K]`` slots it read to
    ``recorded[i]`` (``i``: the branch's position in ``branches``)."""
    recorded: List[List[torch.Tensor]] = [[] for _ in branches]
    observers = []
    for i, branch in enumerate(branches):
        def observe(_branch, indices, _i=i):
            recorded[_i].append(indices.detach())
        branch.observers.append(observe)
        observers.append(observe)
    try:
        yield recorded
    finally:
        for branch, observe in zip(branches, observers):
            branch.observers.remove(observe)


def _read_slots(model: nn.Module, branches, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> List[torch.Tensor]:
    """One forward without gradient: the ``[B, L, K]`` slots each branch read."""
    B, L = input_ids.shape
    with recording(branches) as recorded, torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    return [r[-1].reshape(B, L, -1) for r in recorded]


def _check_batch(input_ids, attention_mask):
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64, torch.int32))
    check_tensor("attention_mask", attention_mask, shape=tuple(input_ids.shape), device=input_ids.device)


def _new_stats(branches) -> SlotStats:
    if not branches:
        raise ValueError("branches must hold at least one PKMBranch")
    sizes = {b.num_slots for b in branches}
    if len(sizes) != 1:
        raise ValueError(f"branches must have equal slot counts, got {sorted(sizes)}")
    return SlotStats(len(branches), sizes.pop(), device=branches[0].pkm.values.device)


def slot_stats(model: nn.Module, branches: Sequence[nn.Module], batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
               stats: Optional[SlotStats] = None) -> SlotStats:
    """Access statistics of ``branches`` over ``batches`` of ``(input_ids [B, L], attention_mask [B, L])``
    (each row one document; padding not counted), added into ``stats`` when given. Returns them."""
    stats = _new_stats(branches) if stats is None else stats
    for input_ids, attention_mask in batches:
        _check_batch(input_ids, attention_mask)
        stats.update(_read_slots(model, branches, input_ids, attention_mask), attention_mask.bool())
    return stats


def group_slot_stats(model: nn.Module, branches: Sequence[nn.Module], input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, groups: torch.Tensor) -> Dict[int, SlotStats]:
    """Access statistics per group of sequences (e.g. every paraphrase of one fact): ``groups [B]``
    ints, one per row of ``input_ids [B, L]``. Returns ``{group: SlotStats}``."""
    _check_batch(input_ids, attention_mask)
    check_tensor("groups", groups, shape=(input_ids.shape[0],), dtypes=(torch.int64, torch.int32))
    read = _read_slots(model, branches, input_ids, attention_mask)
    valid = attention_mask.bool()
    out = {}
    for g in sorted({int(g) for g in groups.tolist()}):
        stats = _new_stats(branches)
        stats.update(read, valid & (groups == g).to(valid.device)[:, None])
        out[g] = stats
    return out


__all__ = ["SlotStats", "tfidf", "recording", "slot_stats", "group_slot_stats"]
