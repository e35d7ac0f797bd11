"""memlayers: memory layers for PyTorch with fused Triton kernels.

Importing this package imports torch only: never faiss, transformers or triton, and never
initializes CUDA (those load on first use).
"""
from ._version import __version__
from .layers import (
    DiscreteKeyValueBottleneck,
    KNNMemoryAttention,
    NeuralMemory,
    NeuralMemoryState,
    ProductKeyMemory,
    StatefulNeuralMemory,
    TitansMAC,
    TitansMAG,
    TitansMAL,
)
from .memory import KNNMemory, KNNSearchResult
from .ops import knn_search, memory_attention, merge_attention, titans_memory

# HuggingFace integration: resolved on first access, so `import memlayers` never imports transformers.
_HF_EXPORTS = ("attach", "detach", "memorize", "reset_memory", "writing", "save_pretrained", "from_pretrained",
               "load_memory", "load_pretrained", "KNNMemoryConfig", "TitansMemoryConfig", "DKVBConfig",
               "PKMConfig")


def __getattr__(name):
    if name in _HF_EXPORTS:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_HF_EXPORTS,
    "__version__",
    "DiscreteKeyValueBottleneck",
    "KNNMemory",
    "KNNMemoryAttention",
    "KNNSearchResult",
    "NeuralMemory",
    "NeuralMemoryState",
    "ProductKeyMemory",
    "StatefulNeuralMemory",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "knn_search",
    "memory_attention",
    "merge_attention",
    "titans_memory",
]
