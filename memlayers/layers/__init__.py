"""Drop-in nn.Modules built on memlayers.ops."""
from .dkvb import DiscreteKeyValueBottleneck
from .knn_attention import KNNMemoryAttention
from .neural_memory import NeuralMemory, NeuralMemoryState, StatefulNeuralMemory
from .pkm import ProductKeyMemory
from .rotary import RotaryCache, apply_rotary, rotary_tables
from .titans import TitansMAC, TitansMAG, TitansMAL

__all__ = [
    "DiscreteKeyValueBottleneck",
    "KNNMemoryAttention",
    "NeuralMemory",
    "NeuralMemoryState",
    "ProductKeyMemory",
    "RotaryCache",
    "StatefulNeuralMemory",
    "TitansMAC",
    "TitansMAG",
    "TitansMAL",
    "apply_rotary",
    "rotary_tables",
]
