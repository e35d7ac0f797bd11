"""A product-key memory branch beside the FFN of chosen decoder layers: ``mlp(x) + pkm(x)``.

The memory's value table starts at zero, so the attached model computes exactly what it computed
before (bit-identical logits) until the values are trained; the query projection and the half-keys
are random and stay frozen in the continual-learning recipes (Lin et al. 2025, "Continual Learning
via Sparse Memory Finetuning", arXiv 2510.15103): the memory is a fixed random hash of the hidden
state into ``num_keys ** 2`` slots, and learning writes into the slots the new data reads.

Each chosen layer's ``mlp`` is replaced by a :class:`PKMBranch` that keeps the original as
``base_layer``; :func:`detach_pkm` puts the very same module objects back.

Two hooks serve ``memlayers.continual``:

- ``observers``: callables ``fn(branch, indices [N, heads * top_k])`` told which slots every token
  read (slot access statistics);
- ``trainable``: an optional module ``fn(indices, weights) -> [N, value_dim]`` whose output is
  added to the read before the gate and output projection: sparse memory fine-tuning keeps only the
  trained rows there (``memlayers.continual.TrainableSlots``), so no dense gradient of the value
  table is ever formed.

    >>> from memlayers.hf.pkm_branch import PKMConfig, attach_pkm, detach_pkm
    >>> branches = attach_pkm(model, PKMConfig(layers=[-4], num_keys=128, top_k=16))
    >>> detach_pkm(model)  # the original MLPs, bit-identical outputs
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.pkm import ProductKeyMemory
from ..ops.embedding_bag import weighted_embedding_bag
from ..ops.utils import check_choice, check_positive_int
from .config import BACKENDS, _Base, _check_layers, resolve_layers
from .families import base_model, family_of
from .state import BaseLayerWrapper, MemoryState, Slot

MLP_ATTR = "mlp"  # the FFN of a decoder layer, in every supported family (Llama layout and GPT-2)
ATTR = "_memlayers_pkm"  # the installed slots, on the model


@dataclass
class PKMConfig(_Base):
    """A product-key memory added to the FFN output of the chosen decoder layers.

    Args:
        layers: which decoder layers (None: all); indices, negative allowed, or ``fn(index, layer)``.
        heads: query heads; their reads are summed.
        num_keys: half-keys per side; each layer's memory holds ``num_keys ** 2`` slots.
        top_k: slots read per head and token.
        value_dim: width of a slot; None: the model's hidden size (no output projection), else a
            frozen random projection maps the read to the hidden size.
        key_dim: query/key width (even); None: ``ProductKeyMemory``'s default.
        qk_norm: unit-norm queries and half-keys (Memory+); spreads the accesses over the slots.
        seed: seeds the random queries and keys, so that a saved recipe re-attaches the same hash.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the fused gather.
    """

    heads: int = 4
    num_keys: int = 256
    top_k: int = 32
    value_dim: Optional[int] = None
    key_dim: Optional[int] = None
    qk_norm: bool = True
    seed: int = 0
    backend: str = "auto"

    kind = "pkm"

    def __post_init__(self):
        _check_layers(self.layers)
        check_positive_int("heads", self.heads)
        check_positive_int("num_keys", self.num_keys, minimum=2)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_keys:
            raise ValueError(f"top_k must be <= num_keys ({self.num_keys}), got {self.top_k}")
        if self.value_dim is not None:
            check_positive_int("value_dim", self.value_dim)
        if self.key_dim is not None:
            check_positive_int("key_dim", self.key_dim, minimum=2)
            if self.key_dim % 2:
                raise ValueError(f"key_dim must be even (two halves), got {self.key_dim}")
        if not isinstance(self.qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {type(self.qk_norm).__name__}")
        check_positive_int("seed", self.seed, minimum=0)
        check_choice("backend", self.backend, BACKENDS)


class PKMBranch(BaseLayerWrapper):
    """``base_layer(x) + pkm(x)``: an FFN with a product-key memory beside it.

    ``pkm`` is a ``ProductKeyMemory`` whose ``values`` start at zero. ``observers`` and ``trainable``
    are the continual-learning hooks described in the module docstring.
    """

    def __init__(self, base_layer: nn.Module, config: PKMConfig, hidden: int, layer_index: int):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        p = next(base_layer.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed * 100003 + layer_index)  # a fixed hash per (seed, layer)
            # top_k positionally: ProductKeyMemory's keyword is being renamed from topk to top_k.
            pkm = ProductKeyMemory(
                hidden, config.heads, config.num_keys, config.top_k, value_dim=config.value_dim,
                key_dim=config.key_dim, qk_norm=config.qk_norm, backend=config.backend,
            )
        with torch.no_grad():
            pkm.values.zero_()  # the branch adds exactly zero: the model is unchanged until trained
        self.pkm = pkm.to(device=p.device, dtype=p.dtype)
        self.observers: List[Callable[["PKMBranch", torch.Tensor], None]] = []
        self.trainable: Optional[nn.Module] = None

    @property
    def num_slots(self) -> int:
        return self.pkm.num_values

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(hidden_states, *args, **kwargs)
        return out + self.read(hidden_states).to(out.dtype)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., hidden]`` -> the memory's contribution ``[..., hidden]``.

        The same computation as ``ProductKeyMemory.forward`` (bit for bit; tested), with the slot
        indices handed to the observers and the trainable rows' read added before the projections.
        """
        pkm = self.pkm
        lead = x.shape[:-1]
        flat = x.reshape(-1, pkm.dim).to(pkm.values.dtype)
        indices, weights = pkm.address(flat)
        T = flat.shape[0]
        indices, weights = indices.reshape(T, -1), weights.reshape(T, -1).to(pkm.values.dtype)
        for observe in self.observers:
            observe(self, indices)
        read = weighted_embedding_bag(pkm.values, indices, weights, backend=pkm.backend, check_indices=False)
        if self.trainable is not None:
            read = read + self.trainable(indices, weights).to(read.dtype)
        if pkm.gate is not None:
            read = read * F.silu(pkm.gate(flat)).to(read.dtype)
        if pkm.out_proj is not None:
            read = pkm.out_proj(read.to(pkm.out_proj.weight.dtype))
        return read.reshape(*lead, read.shape[-1])


def build(model: nn.Module, config: PKMConfig, state: MemoryState) -> List[Slot]:
    """The attach builder: one ``PKMBranch`` around each chosen layer's ``mlp`` (layers resolved)."""
    decoder = state.family.layers(base_model(model))
    hidden = model.config.hidden_size
    slots = []
    for i in config.layers:
        layer = decoder[i]
        mlp = state.current(layer, MLP_ATTR)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"decoder layer {i} has no '{MLP_ATTR}' module to put a product-key memory beside")
        slots.append(Slot(parent=layer, attr=MLP_ATTR, wrapper=PKMBranch(mlp, config, hidden, i), layer=i))
    return slots


def attach_pkm(model: nn.Module, config: PKMConfig) -> List[PKMBranch]:
    """Put a ``PKMBranch`` beside the FFN of ``config.layers`` of ``model`` (in place); returns the branches.

    Raises ``TypeError``/``ValueError`` (the model unchanged) for an unsupported model, a config
    that is not a ``PKMConfig``, a layer out of range, or a memory already attached.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    if not isinstance(config, PKMConfig):
        raise TypeError(f"config must be a PKMConfig, got {type(config).__name__}")
    if ATTR in model.__dict__:
        raise ValueError("model already has a product-key memory attached; detach_pkm first")
    state = MemoryState(family=family_of(model))
    decoder = state.family.layers(base_model(model))
    resolved = dataclasses.replace(config, layers=resolve_layers(config.layers, decoder))
    slots = build(model, resolved, state)  # every wrapper built before any is installed
    for slot in slots:
        setattr(slot.parent, slot.attr, slot.wrapper)
    model.__dict__[ATTR] = slots
    return [s.wrapper for s in slots]


def pkm_branches(model: nn.Module) -> List[PKMBranch]:
    """The attached branches, in decoder-layer order (empty when none is attached)."""
    return [s.wrapper for s in model.__dict__.get(ATTR, [])]


def detach_pkm(model: nn.Module) -> nn.Module:
    """Put the original FFN modules back (the same objects): outputs are bit-identical to before."""
    slots = model.__dict__.get(ATTR)
    if slots is None:
        raise ValueError("model has no product-key memory attached; call attach_pkm(model, config) first")
    for slot in reversed(slots):
        setattr(slot.parent, slot.attr, slot.wrapper.base_layer)
    del model.__dict__[ATTR]
    return model


__all__ = ["PKMConfig", "PKMBranch", "attach_pkm", "detach_pkm", "pkm_branches", "build"]
