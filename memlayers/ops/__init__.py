"""Operators: one folder each, naive reference beside the Triton kernel (see DESIGN.md)."""
from .knn_search import knn_search
from .memory_attention import local_attention, memory_attention, merge_attention
from .titans import titans_memory

__all__ = ["knn_search", "local_attention", "memory_attention", "merge_attention", "titans_memory"]
