"""Continual knowledge injection into product-key memories, and exact unlearning.

- :class:`SlotStats`, :func:`slot_stats`, :func:`group_slot_stats`: slot access counts over a corpus
  or a stream of batches, on the memories' device; :func:`tfidf` scores against a background corpus.
- :class:`SparseMemoryFinetuning`: sparse memory fine-tuning (Lin et al. 2025, arXiv 2510.15103):
  only the top-t slots by TF-IDF of each group of training sequences are trained.
- :class:`SlotLedger`: which slots each group wrote and their old values; ``forget`` resets them
  exactly, leaving everything else bit for bit.

The memories are ``PKMBranch`` modules attached beside the FFN by
``ml.attach(model, ml.PKMConfig(...))``.
"""
from .sparse import SparseMemoryFinetuning, TrainableSlots
from .stats import SlotStats, group_slot_stats, recording, slot_stats, tfidf
from .unlearn import SlotLedger

__all__ = [
    "SlotStats", "slot_stats", "group_slot_stats", "recording", "tfidf",
    "SparseMemoryFinetuning", "TrainableSlots", "SlotLedger",
]
