"""Drop-in nn.Modules built on memlayers.ops."""
from .neural_memory import NeuralMemory, NeuralMemoryState
from .titans import TitansMAC, TitansMAG, TitansMAL

__all__ = ["NeuralMemory", "NeuralMemoryState", "TitansMAC", "TitansMAG", "TitansMAL"]
