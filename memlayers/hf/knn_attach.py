"""Building the kNN attachment: wrap the attention module of each chosen decoder layer."""
from __future__ import annotations

from typing import List

from torch import nn

from .families import base_model
from .knn import KNNAttention
from .positions import PositionShift
from .state import AttachPlan, Slot, positions_of


def original(module: nn.Module) -> nn.Module:
    """The model's own module under any memlayers wrappers."""
    while getattr(module, "_memlayers_wrapper", False):
        module = module.base_layer
    return module


def position_slot(model: nn.Module, plan: AttachPlan) -> List[Slot]:
    """The model-wide ``PositionShift``: the installed one, or a new one (its slot returned)."""
    if plan.positions is None:
        plan.positions = positions_of(model)
    if plan.positions is not None:
        return []
    fam = plan.family
    base = base_model(model)
    plan.positions = PositionShift(getattr(base, fam.position_attr), rotary=fam.rotary,
                                   max_positions=fam.max_positions(model.config),
                                   base_attn=model.config._attn_implementation)
    return [Slot(parent=base, attr=fam.position_attr, wrapper=plan.positions, layer=-1)]


def build(model, config, plan: AttachPlan) -> List[Slot]:
    fam = plan.family
    slots = position_slot(model, plan)
    q_heads, kv_heads, head_dim = fam.heads(model.config)
    decoder = fam.layers(base_model(model))
    for i in config.layers:
        layer = original(decoder[i])
        attn = getattr(layer, fam.attention_attr)
        wrapper = KNNAttention(attn, config, i, q_heads, kv_heads, head_dim, plan.positions, fam.rotary)
        slots.append(Slot(parent=layer, attr=fam.attention_attr, wrapper=wrapper, layer=i))
    return slots
