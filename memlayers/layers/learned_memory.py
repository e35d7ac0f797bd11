"""``LearnedMemory``: the memory-state protocol for memories held in learned tables (DKVB, PKM).

Their memory is their parameters, trained like any weight: there is no per-row runtime state to
forget or to bind to a batch size. They still are memory modules, so that walking a model
(``memlayers.memory.protocol.memory_modules``) finds every memory, and a reset or a batch change
through the walk treats all memories alike.
"""
from __future__ import annotations

from typing import Optional

from ..memory.protocol import MemoryModule
from ..ops.utils import check_positive_int


class LearnedMemory(MemoryModule):
    """Mixin for ``nn.Module`` memories whose state is learned parameters only."""

    def reset_memory(self, rows=None) -> None:
        """Nothing per row to forget: the tables are weights (train or reload them to change them)."""

    def bind_batch(self, batch_size: int) -> None:
        """Any batch size fits; checks ``batch_size`` and changes nothing."""
        check_positive_int("batch_size", batch_size)

    @property
    def memory_batch_size(self) -> Optional[int]:
        return None


__all__ = ["LearnedMemory"]
