"""HuggingFace integration: attach memory layers to a pretrained causal LM, memorize long inputs,
generate with memory, save and load it all.

transformers is imported lazily (inside functions): importing this package does not import it.

    >>> import memlayers as ml
    >>> ml.attach(model, ml.KNNMemoryConfig(layers=[-2, -1], top_k=64))
    >>> ml.memorize(model, long_ids, chunk_size=512)
    >>> model.generate(question_ids, max_new_tokens=32)
    >>> ml.detach(model)   # the original modules, bit-identical outputs
"""
from .attach import attach, detach
from .config import DKVBConfig, KNNMemoryConfig, PKMConfig, TitansMemoryConfig
from .memorize import memorize, reset_memory, writing
from .persist import from_pretrained, load_memory, save_pretrained
from .pretrained import load_pretrained

__all__ = [
    "attach", "detach", "memorize", "reset_memory", "writing", "KNNMemoryConfig", "TitansMemoryConfig", "DKVBConfig", "PKMConfig",
    "save_pretrained", "from_pretrained", "load_memory", "load_pretrained",
]
