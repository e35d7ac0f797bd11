"""Operators: one folder each, naive reference beside the Triton kernel (see DESIGN.md)."""
from .knn_search import knn_search
from .titans import titans_memory

__all__ = ["knn_search", "titans_memory"]
