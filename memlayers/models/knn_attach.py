"""Building the kNN attachment: wrap the attention module of each chosen decoder layer."""
from __future__ import annotations

from typing import List

from .attach import original, position_slot
from .families import base_model
from .knn import KNNAttention
from .state import MemoryState, Slot


def build(model, config, state: MemoryState) -> List[Slot]:
    fam = state.family
    if state.base_attn is None:
        state.base_attn = model.config._attn_implementation
    position_slot(model, state)
    q_heads, kv_heads, head_dim = fam.heads(model.config)
    decoder = fam.layers(base_model(model))
    slots = []
    for i in config.layers:
        layer = original(decoder[i])
        attn = getattr(layer, fam.attention_attr)
        wrapper = KNNAttention(attn, config, i, q_heads, kv_heads, head_dim, state)
        slots.append(Slot(parent=layer, attr=fam.attention_attr, wrapper=wrapper, layer=i))
    return slots
