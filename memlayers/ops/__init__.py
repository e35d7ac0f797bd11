"""Operators: one folder each, naive reference beside the Triton kernel (see DESIGN.md)."""
from .knn_search import knn_search

__all__ = ["knn_search"]
