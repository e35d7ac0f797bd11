"""Where each supported model family keeps what an attachment touches.

A family names the decoder layers, the attention module inside a layer, the module that turns
position ids into position information, and the head geometry. Llama, Mistral, Qwen2 and Qwen3
share one layout (``LLAMA``), GPT-2 has its own (``GPT2``).
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
    eager: Callable[[], Callable]                    # -> the family's eager attention function


def _llama_heads(config):
    q = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q
    return q, kv, head_dim


def _llama_eager():
    # Mistral, Qwen2 and Qwen3 carry copies of Llama's eager function ("Copied from" in transformers).
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward


def _gpt2_eager():
    from transformers.models.gpt2.modeling_gpt2 import eager_attention_forward

    return eager_attention_forward


def _gpt2_heads(config):
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, config.num_attention_heads, head_dim


# Rotary embedding applied inside attention, grouped-query heads, ``model.layers[i].self_attn``,
# ``model.rotary_emb``.
LLAMA = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers=lambda base: base.layers,
    attention_attr="self_attn",
    position_attr="rotary_emb",
    rotary=True,
    heads=_llama_heads,
    max_positions=lambda config: 0,
    eager=_llama_eager,
)

# Learned absolute positions (``transformer.wpe``), no rotary embedding, multi-head attention in
# ``transformer.h[i].attn``.
GPT2 = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers=lambda base: base.h,
    attention_attr="attn",
    position_attr="wpe",
    rotary=False,
    heads=_gpt2_heads,
    max_positions=lambda config: config.max_position_embeddings,
    eager=_gpt2_eager,
)

FAMILIES = (LLAMA, GPT2)


def family_of(model: nn.Module) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    supported = sorted(t for fam in FAMILIES for t in fam.model_types)
    raise ValueError(f"model: memlayers attaches to model types {supported}, got {model_type!r}")


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``LlamaModel``, ``GPT2Model``) of a causal LM, or the model itself."""
    return getattr(model, "base_model", model)
