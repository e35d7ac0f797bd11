"""memlayers: memory layers for PyTorch with fused Triton kernels.

Importing this package imports torch only: never faiss, transformers or triton, and never
initializes CUDA (those load on first use).
"""
from ._version import __version__
from .layers import KNNMemoryAttention, NeuralMemory, NeuralMemoryState, TitansMAC, TitansMAG, TitansMAL
from .memory import KNNMemory, KNNSearchResult
from .ops import knn_search, memory_attention, merge_attention, titans_memory

__all__ = [
    "__version__",
    "KNNMemory",
    "KNNMemoryAttention",
    "KNNSearchResult",
    "NeuralMemory",
    "NeuralMemoryState",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "knn_search",
    "memory_attention",
    "merge_attention",
    "titans_memory",
]
