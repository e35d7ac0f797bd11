"""memlayers: memory layers for PyTorch with fused Triton kernels.

Importing this package imports torch only: never faiss, transformers or triton, and never
initializes CUDA (those load on first use).
"""
from ._version import __version__
from .layers import NeuralMemory, NeuralMemoryState, TitansMAC, TitansMAG, TitansMAL
from .memory import KNNMemory, KNNSearchResult
from .ops import knn_search, titans_memory

__all__ = [
    "__version__",
    "KNNMemory",
    "KNNSearchResult",
    "NeuralMemory",
    "NeuralMemoryState",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "knn_search",
    "titans_memory",
]
