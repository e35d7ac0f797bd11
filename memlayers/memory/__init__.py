"""The kNN memory store (ring buffers per batch row and kv-head) and its FAISS index adapter.

faiss is imported lazily, only by a memory built with a FAISS ``index`` ("flat", "ivf", "hnsw").
"""
from .result import KNNSearchResult
from .store import KNNMemory

__all__ = ["KNNMemory", "KNNSearchResult"]
