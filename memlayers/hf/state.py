"""What is attached to a model, found by walking its modules, and the swap in and out.

Every attachment replaces one module by a wrapper that keeps the original as ``base_layer``. The
wrappers ``attach`` installs name their kind (``attachment_kind``: ``"knn"``, ``"titans"``,
``"dkvb"``, ``"pkm"``, or ``"positions"`` for the model-wide ``PositionShift``); ``installed(model)`` finds
them by walking the model, so the model itself is the only record of what is attached (no side
object). ``uninstall`` puts the originals back (the very same module objects) and returns the slots
that ``install`` puts back in place, so ``detach`` and a clean ``save_pretrained`` are the same
operation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import nn

from .attention import implementation_name
from .families import Family, family_of

KINDS = ("knn", "titans", "dkvb", "pkm", "positions")


class BaseLayerWrapper(nn.Module):
    """A wrapper that keeps the module it replaces as ``base_layer``; code that reads the wrapped
    module's attributes (``layer_idx``, ``head_dim``, ...) through the wrapper still finds them.

    ``attachment_kind`` names the wrappers ``memlayers.attach`` installs (``detach`` removes those
    only); ``attachment`` is the index of the ``attach`` config that made it (in attach order) and
    ``memory_config`` that config (layer indices resolved).
    """

    _memlayers_wrapper = True
    attachment_kind: Optional[str] = None

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
class AttachPlan:
    """The attach call in progress: the model's family, the slots built so far (not yet installed),
    and the model's ``PositionShift`` (installed, or built by this call)."""

    family: Family
    building: List[Slot] = field(default_factory=list)
    positions: Optional[nn.Module] = None

    def current(self, parent: nn.Module, attr: str) -> nn.Module:
        """What ``parent.<attr>`` will be once the attach in progress installs its wrappers."""
        for slot in reversed(self.building):
            if slot.parent is parent and slot.attr == attr:
                return slot.wrapper
        return getattr(parent, attr)


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")


def installed(model: nn.Module, kinds=KINDS) -> List[Slot]:
    """The installed ``attach`` wrappers of ``kinds``, outermost first (a walk of ``model``)."""
    _check_model(model)
    slots = []
    for name, module in model.named_modules():
        if getattr(module, "attachment_kind", None) in kinds and getattr(module, "_memlayers_wrapper", False):
            parent_name, _, attr = name.rpartition(".")
            slots.append(Slot(parent=model.get_submodule(parent_name), attr=attr, wrapper=module,
                              layer=getattr(module, "layer_index", -1)))
    return slots


def memory_wrappers(model: nn.Module, kinds=("knn", "titans", "dkvb", "pkm")) -> List[nn.Module]:
    return [s.wrapper for s in installed(model, kinds)]


def positions_of(model: nn.Module) -> Optional[nn.Module]:
    """The model's ``PositionShift`` (None: no kNN memory attached)."""
    found = installed(model, ("positions",))
    return found[0].wrapper if found else None


def require_attached(model: nn.Module) -> List[Slot]:
    slots = installed(model)
    if not slots:
        raise ValueError("model has no memory attached; call memlayers.attach(model, config) first")
    return slots


def attached_configs(model: nn.Module) -> List:
    """The configs of the attachments, in attach order (each once)."""
    by_index = {}
    for w in memory_wrappers(model):
        by_index.setdefault(w.attachment, w.memory_config)
    return [by_index[i] for i in sorted(by_index)]


def install(model: nn.Module, slots: List[Slot]) -> None:
    """Put ``slots`` (as ``uninstall`` returned them) back in place."""
    for slot in slots:
        setattr(slot.parent, slot.attr, slot.wrapper)
    pos = next((s.wrapper for s in slots if s.wrapper.attachment_kind == "positions"), None)
    if pos is not None:
        model.set_attn_implementation(implementation_name(pos.base_attn, family_of(model)))


def uninstall(model: nn.Module) -> List[Slot]:
    """Put the original modules back; returns the slots, outermost first, for ``install``."""
    slots = installed(model)
    for slot in reversed(slots):  # innermost first: an outer wrapper's base_layer is restored before it
        setattr(slot.parent, slot.attr, slot.wrapper.base_layer)
    pos = next((s.wrapper for s in slots if s.wrapper.attachment_kind == "positions"), None)
    if pos is not None:
        model.set_attn_implementation(pos.base_attn)
    return slots
