"""Building the kNN attachment: wrap the attention module of each chosen decoder layer."""
from __future__ import annotations

from typing import List

from torch import nn

from .families import base_model
from .knn import KNNAttention
from .positions import PositionShift
from .state import MemoryState, Slot


def original(module: nn.Module) -> nn.Module:
    """The model's own module under any memlayers wrappers."""
    while getattr(module, "_memlayers_wrapper", False):
        module = module.base_layer
    return module


def position_slot(model: nn.Module, state: MemoryState) -> Slot:
    """The model-wide ``PositionShift`` (created by the first kNN attachment)."""
    if state.position_slot is None:
        fam = state.family
        base = base_model(model)
        wrapper = PositionShift(getattr(base, fam.position_attr), rotary=fam.rotary,
                                max_positions=fam.max_positions(model.config))
        state.position_slot = Slot(parent=base, attr=fam.position_attr, wrapper=wrapper, layer=-1)
    return state.position_slot


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
