"""Where each supported model family keeps what an attachment touches.

A family names the decoder layers, the attention module inside a layer, the module that turns
position ids into position information, and the head geometry. Llama, Mistral, Qwen2 and Qwen3
share one layout (``llama.py``), GPT-2 has its own (``gpt2.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Tuple

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    model_types: Tuple[str, ...]
    layers: Callable[[nn.Module], nn.ModuleList]    # base model -> decoder layers
    attention_attr: str                              # attribute of a decoder layer
    position_attr: str                               # attribute of the base model
    rotary: bool
    heads: Callable[[object], Tuple[int, int, int]]  # config -> (q heads, kv heads, head dim)
    max_positions: Callable[[object], int]           # config -> learned positions (0: unlimited)


def family_of(model: nn.Module) -> Family:
    from . import gpt2, llama

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for fam in (llama.FAMILY, gpt2.FAMILY):
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for fam in (llama.FAMILY, gpt2.FAMILY) for t in fam.model_types)
    raise ValueError(f"model: memlayers attaches to model types {supported}, got {model_type!r}")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, ``GPT2Model``) of a causal LM, or the model itself."""
    return getattr(model, "base_model", model)
