"""Drop-in nn.Modules built on memlayers.ops."""
from .knn_attention import KNNMemoryAttention
from .neural_memory import NeuralMemory, NeuralMemoryState
from .rotary import RotaryCache, apply_rotary, rotary_tables
from .titans import TitansMAC, TitansMAG, TitansMAL

__all__ = [
    "KNNMemoryAttention",
    "NeuralMemory",
    "NeuralMemoryState",
    "RotaryCache",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "apply_rotary",
    "rotary_tables",
]
