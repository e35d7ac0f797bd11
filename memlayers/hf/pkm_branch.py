"""A product-key memory branch beside the FFN of chosen decoder layers: ``mlp(x) + pkm(x)``.

The memory's value table starts at zero, so the attached model computes exactly what it computed
before (bit-identical logits) until the values are trained; the query projection and the half-keys
are random and stay frozen in the continual-learning recipes (Lin et al. 2025, "Continual Learning
via Sparse Memory Finetuning", arXiv 2510.15103): the memory is a fixed random hash of the hidden
state into ``num_keys ** 2`` slots, and learning writes into the slots the new data reads.

Attached with ``ml.attach(model, ml.PKMConfig(...))``: each chosen layer's ``mlp`` is replaced by a
:class:`PKMBranch` that keeps the original as ``base_layer``; ``ml.detach`` puts the very same module
objects back.

Two hooks serve ``memlayers.continual``:

- ``observers``: callables ``fn(branch, indices [N, heads * top_k])`` told which slots every token
  read (slot access statistics);
- ``trainable``: an optional module ``fn(indices, weights) -> [N, value_dim]`` whose output is
  added to the read before the gate and output projection: sparse memory fine-tuning keeps only the
  trained rows there (``memlayers.continual.TrainableSlots``), so no dense gradient of the value
  table is ever formed.

    >>> import memlayers as ml
    >>> from memlayers.hf.pkm_branch import pkm_branches
    >>> branches = pkm_branches(ml.attach(model, ml.PKMConfig(layers=[-4], num_keys=128, top_k=16)))
    >>> ml.detach(model)  # the original MLPs, bit-identical outputs
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.pkm import ProductKeyMemory
from ..ops.embedding_bag import weighted_embedding_bag
from .config import PKMConfig
from .families import base_model
from .state import AttachPlan, BaseLayerWrapper, Slot, memory_wrappers

MLP_ATTR = "mlp"  # the FFN of a decoder layer, in every supported family (Llama layout and GPT-2)


class PKMBranch(BaseLayerWrapper):
    """``base_layer(x) + pkm(x)``: an FFN with a product-key memory beside it.

    ``pkm`` is a ``ProductKeyMemory`` whose ``values`` start at zero. ``observers`` and ``trainable``
    are the continual-learning hooks described in the module docstring.
    """

    attachment_kind = "pkm"

    def __init__(self, base_layer: nn.Module, config: PKMConfig, hidden: int, layer_index: int):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.memory_config = config
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


def build(model: nn.Module, config: PKMConfig, plan: AttachPlan) -> List[Slot]:
    """The attach builder: one ``PKMBranch`` around each chosen layer's ``mlp`` (layers resolved)."""
    decoder = plan.family.layers(base_model(model))
    hidden = model.config.hidden_size
    slots = []
    for i in config.layers:
        layer = decoder[i]
        mlp = plan.current(layer, MLP_ATTR)
        if not isinstance(mlp, nn.Module):
            raise ValueError(f"decoder layer {i} has no '{MLP_ATTR}' module to put a product-key memory beside")
        slots.append(Slot(parent=layer, attr=MLP_ATTR, wrapper=PKMBranch(mlp, config, hidden, i), layer=i))
    return slots


def pkm_branches(model: nn.Module) -> List[PKMBranch]:
    """The attached product-key branches, in decoder-layer order (empty when none is attached)."""
    return sorted(memory_wrappers(model, ("pkm",)), key=lambda w: w.layer_index)


__all__ = ["PKMBranch", "pkm_branches", "build"]
