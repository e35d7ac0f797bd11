"""Operators: one folder each, naive reference beside the Triton kernel (see docs/design.md)."""
from .dkvb import dkvb_lookup
from .embedding_bag import weighted_embedding_bag
from .knn_search import knn_search
from .local_attention import local_attention
from .memory_attention import memory_attention, merge_attention
from .titans import titans_memory

__all__ = [
    "dkvb_lookup",
    "knn_search",
    "local_attention",
    "memory_attention",
    "merge_attention",
    "titans_memory",
    "weighted_embedding_bag",
]
