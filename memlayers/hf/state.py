"""The model-wide record of what is attached (``model._memlayers``), and the swap in and out.

Every attachment replaces one module by a wrapper that keeps the original as ``base_layer``;
``install`` puts the wrappers in place, ``uninstall`` puts the originals back (the very same module
objects), so ``detach`` and a clean ``save_pretrained`` are the same operation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from .attention import implementation_name
from .families import Family

ATTR = "_memlayers"


class BaseLayerWrapper(nn.Module):
    """A wrapper that keeps the module it replaces as ``base_layer``; code that reads the wrapped
    module's attributes (``layer_idx``, ``head_dim``, ...) through the wrapper still finds them."""

    _memlayers_wrapper = True

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)


@dataclass
class Slot:
    """One replaced module: ``parent.<attr>`` is ``wrapper`` while installed, ``wrapper.base_layer`` after."""

    parent: nn.Module
    attr: str
    wrapper: nn.Module
    layer: int  # decoder layer index (-1 for the model-wide position module)


@dataclass
class Attachment:
    config: object  # a config with resolved layer indices
    slots: List[Slot]


@dataclass
class MemoryState:
    family: Family
    attachments: List[Attachment] = field(default_factory=list)
    position_slot: Optional[Slot] = None
    base_attn: Optional[str] = None  # the model's attn implementation before kNN attached
    writing: bool = False             # memorize is running
    write_positions: Optional[torch.Tensor] = None  # [B, T] absolute positions of the chunk being memorized
    max_offset: int = 0               # largest count of memorized tokens over the batch rows (host side)
    building: List[Slot] = field(default_factory=list)  # slots built by the attach call in progress

    def current(self, parent: nn.Module, attr: str) -> nn.Module:
        """What ``parent.<attr>`` will be once the attach in progress installs its wrappers."""
        for slot in reversed(self.building):
            if slot.parent is parent and slot.attr == attr:
                return slot.wrapper
        return getattr(parent, attr)

    @property
    def positions(self):
        return None if self.position_slot is None else self.position_slot.wrapper

    def slots(self) -> List[Slot]:
        out = [s for a in self.attachments for s in a.slots]
        return out + ([self.position_slot] if self.position_slot is not None else [])

    def wrappers(self, kind: Optional[str] = None) -> List[nn.Module]:
        return [s.wrapper for a in self.attachments if kind is None or a.config.kind == kind for s in a.slots]

    def sync_offsets(self) -> None:
        pos = self.positions
        self.max_offset = int(pos.offset.max()) if pos is not None and pos.offset.numel() else 0


def get_state(model, required: bool = True) -> Optional[MemoryState]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    state = model.__dict__.get(ATTR)
    if state is None and required:
        raise ValueError("model has no memory attached; call memlayers.attach(model, config) first")
    return state


def install(model, state: MemoryState) -> None:
    # Outermost last: a decoder layer wrapped twice is wrapped in attachment order.
    for slot in state.slots():
        setattr(slot.parent, slot.attr, slot.wrapper)
    if state.base_attn is not None:
        model.set_attn_implementation(implementation_name(state.base_attn, state.family))


def uninstall(model, state: MemoryState) -> None:
    for slot in reversed(state.slots()):
        setattr(slot.parent, slot.attr, slot.wrapper.base_layer)
    if state.base_attn is not None:
        model.set_attn_implementation(state.base_attn)
