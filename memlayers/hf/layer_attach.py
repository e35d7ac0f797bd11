"""Attachments that wrap whole decoder layers: a Titans ``NeuralMemory`` branch and a DKVB bottleneck.

Both add a gated branch to the layer's output, ``h = layer(x) + gate * branch``, with the gate (one
value per channel) zero-initialized: the attached model computes exactly what it computed before
until the gate is trained.

Titans memory state is per batch row, in the buffers of a ``StatefulNeuralMemory``. It learns only
while ``memorize`` runs (each chunk is read
into the memory, chunk after chunk); every other forward pass, generation included, reads the
memorized state without changing it, so a forward over a continuation and a token-by-token
generation of it see the same memory.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from .config import DKVBConfig, TitansMemoryConfig
from .families import base_model
from .state import AttachPlan, BaseLayerWrapper, Slot


class _GatedLayer(BaseLayerWrapper):
    """``base_layer(x, ...) + gate * branch(...)``; subclasses define ``branch`` and ``gate_name``
    (distinct per kind: wrappers nest, and attribute lookups fall through to the wrapped layer)."""

    gate_name = ""

    def __init__(self, base_layer: nn.Module, hidden: int, layer_index: int, config):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        self.memory_config = config
        p = next(base_layer.parameters())
        self.register_parameter(self.gate_name, nn.Parameter(torch.zeros(hidden, device=p.device, dtype=p.dtype)))

    def forward(self, hidden_states, *args, **kwargs):
        out = self.base_layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + getattr(self, self.gate_name) * self.branch(hidden_states, h).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


class TitansLayer(_GatedLayer):
    """A decoder layer with a Titans branch reading the layer's input: ``titans_memory``, a
    ``StatefulNeuralMemory`` whose per-row state lives in its buffers (the memory-state protocol).
    It learns while ``writing`` (set by ``memorize``) and only reads otherwise; inside a
    ``writing(model)`` block it keeps the layer inputs it reads in ``recorded`` (a list of
    ``[B, T, hidden]`` pieces, None otherwise), which the block's end learns."""

    gate_name = "titans_gate"
    attachment_kind = "titans"

    def __init__(self, base_layer: nn.Module, config: TitansMemoryConfig, hidden: int, layer_index: int):
        super().__init__(base_layer, hidden, layer_index, config)
        from ..layers.neural_memory import NeuralMemory, StatefulNeuralMemory

        p = next(base_layer.parameters())
        self.writing = False
        self.recorded = None
        self.titans_memory = StatefulNeuralMemory(NeuralMemory(
            hidden, heads=config.heads, head_dim=config.head_dim, memory=config.memory, depth=config.depth,
            expansion=config.expansion, chunk_size=config.chunk_size, momentum=config.momentum,
            forget=config.forget, conv_size=config.conv_size, max_lr=config.max_lr, backend=config.backend,
        )).to(p.device)
        self.train(base_layer.training)  # the model's mode: an eval model gets an eval branch

    def branch(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        memory = self.titans_memory
        rows = memory.memory_batch_size
        if rows is not None and rows != x.shape[0]:
            raise ValueError(
                f"layer {self.layer_index}'s Titans memory holds {rows} batch rows but the input has "
                f"{x.shape[0]}; use the memorized batch, or reset_memory"
            )
        if self.recorded is not None and not self.writing:
            self.recorded.append(x)
        return memory(x.to(memory.neural_memory.to_qkv.weight.dtype), learn=self.writing)

    def learn(self, x: torch.Tensor) -> None:
        """Read the layer inputs ``x [B, T, hidden]`` into the memory (what ``memorize`` learns)."""
        memory = self.titans_memory
        memory(x.to(memory.neural_memory.to_qkv.weight.dtype), learn=True)


class DKVBLayer(_GatedLayer):
    """A decoder layer whose output passes through a Discrete Key-Value Bottleneck branch."""

    gate_name = "dkvb_gate"
    attachment_kind = "dkvb"

    def __init__(self, base_layer: nn.Module, config: DKVBConfig, hidden: int, layer_index: int):
        super().__init__(base_layer, hidden, layer_index, config)
        if hidden % config.num_codebooks:
            raise ValueError(f"num_codebooks ({config.num_codebooks}) must divide the model's hidden size ({hidden})")
        from ..layers.dkvb import DiscreteKeyValueBottleneck

        p = next(base_layer.parameters())
        self.dkvb = DiscreteKeyValueBottleneck(
            hidden, config.num_codebooks, config.num_keys, key_dim=config.key_dim,
            value_dim=hidden // config.num_codebooks, top_k=config.top_k, splitter="random", decoder="none",
            backend=config.backend,
        ).to(p.device)
        self.train(base_layer.training)  # the model's mode: an eval model gets an eval branch

    def branch(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = self.dkvb(h.to(self.dkvb.values.dtype))  # [..., C, Dv]
        return out.flatten(-2)


def _build(cls, model, config, plan: AttachPlan) -> List[Slot]:
    decoder = plan.family.layers(base_model(model))
    hidden = model.config.hidden_size
    slots = []
    for i in config.layers:
        # The layer may already be wrapped (another attachment): this wrapper goes around that one.
        wrapper = cls(plan.current(decoder, str(i)), config, hidden, i)
        slots.append(Slot(parent=decoder, attr=str(i), wrapper=wrapper, layer=i))
    return slots


BUILDERS = {
    "titans": lambda model, config, plan: _build(TitansLayer, model, config, plan),
    "dkvb": lambda model, config, plan: _build(DKVBLayer, model, config, plan),
}
