"""Attachments that wrap whole decoder layers: a Titans ``NeuralMemory`` branch and a DKVB bottleneck.

Both add a gated branch to the layer's output, ``h = layer(x) + gate * branch``, with the gate (one
value per channel) zero-initialized: the attached model computes exactly what it computed before
until the gate is trained.

Titans memory state is per batch row. It learns only while ``memorize`` runs (each chunk is read
into the memory, chunk after chunk); every other forward pass, generation included, reads the
memorized state without changing it, so a forward over a continuation and a token-by-token
generation of it see the same memory.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .config import DKVBConfig, TitansMemoryConfig
from .families import base_model
from .state import BaseLayerWrapper, MemoryState, Slot


class _GatedLayer(BaseLayerWrapper):
    """``base_layer(x, ...) + gate * branch(...)``; subclasses define ``branch`` and ``gate_name``
    (distinct per kind: wrappers nest, and attribute lookups fall through to the wrapped layer)."""

    gate_name = ""

    def __init__(self, base_layer: nn.Module, hidden: int, layer_index: int, shared):
        super().__init__()
        self.base_layer = base_layer
        self.layer_index = layer_index
        p = next(base_layer.parameters())
        self.register_parameter(self.gate_name, nn.Parameter(torch.zeros(hidden, device=p.device, dtype=p.dtype)))
        object.__setattr__(self, "shared", shared)

    def forward(self, hidden_states, *args, **kwargs):
        out = self.base_layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + getattr(self, self.gate_name) * self.branch(hidden_states, h).to(h.dtype)
        return (h, *out[1:]) if isinstance(out, tuple) else h


class TitansLayer(_GatedLayer):
    """A decoder layer with a Titans ``NeuralMemory`` branch reading the layer's input."""

    gate_name = "titans_gate"

    def __init__(self, base_layer: nn.Module, config: TitansMemoryConfig, hidden: int, layer_index: int, shared):
        super().__init__(base_layer, hidden, layer_index, shared)
        from ..layers.neural_memory import NeuralMemory

        p = next(base_layer.parameters())
        self.neural_memory = NeuralMemory(
            hidden, heads=config.heads, head_dim=config.head_dim, memory=config.memory, depth=config.depth,
            expansion=config.expansion, chunk_size=config.chunk_size, momentum=config.momentum,
            forget=config.forget, conv_size=config.conv_size, max_lr=config.max_lr, backend=config.backend,
        ).to(p.device)
        self.memory_state = None  # NeuralMemoryState after the memorized tokens (None: the initial memory)

    def branch(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        state = self.memory_state
        if state is not None and state.batch_size != x.shape[0]:
            raise ValueError(
                f"layer {self.layer_index}'s Titans memory holds {state.batch_size} batch rows but the input has "
                f"{x.shape[0]}; use the memorized batch, or reset_memory"
            )
        x = x.to(self.neural_memory.to_qkv.weight.dtype)
        if self.shared.writing:
            y, new_state = self.neural_memory(x, state)
            self.memory_state = new_state.detach()
            return y
        return self.neural_memory.read(x, state)

    def batch_rows(self) -> Optional[int]:
        return None if self.memory_state is None else self.memory_state.batch_size

    @torch.no_grad()
    def reset_rows(self, rows: torch.Tensor) -> None:
        state = self.memory_state
        if state is None:
            return
        if bool(rows.all()):
            self.memory_state = None
            return
        from dataclasses import replace

        fresh = self.neural_memory.initial_state(state.batch_size, rows.device)

        def pick(new, old):
            if old is None:
                return None
            m = rows.to(old.device).view(-1, *([1] * (old.dim() - 1)))
            return torch.where(m, new.to(old.dtype), old)

        def pick_all(news, olds):
            return None if olds is None else tuple(pick(n, o) for n, o in zip(news, olds))

        # Pending tokens of a reset row get learning rate and forgetting 0: they change nothing.
        k, v, theta, alpha, eta = state.pending
        zero = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
        pending = (k, v, pick(zero(theta), theta), pick(zero(alpha), alpha), eta)
        self.memory_state = replace(
            state,
            weights=pick_all(fresh.weights, state.weights), momentum=pick_all(fresh.momentum, state.momentum),
            chunk_weights=pick_all(fresh.chunk_weights, state.chunk_weights),
            chunk_momentum=pick_all(fresh.chunk_momentum, state.chunk_momentum),
            pending=pending,
            conv_cache=pick(zero(state.conv_cache), state.conv_cache),
        )

    # The memory state travels in the state dict as "state.<field>.<i>" tensors.
    _FIELDS = ("weights", "momentum", "chunk_weights", "chunk_momentum", "pending")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = self.memory_state
        if state is None:
            return
        for name in self._FIELDS:
            for i, t in enumerate(getattr(state, name) or ()):
                if t is not None:
                    destination[f"{prefix}state.{name}.{i}"] = t
        if state.conv_cache is not None:
            destination[f"{prefix}state.conv_cache"] = state.conv_cache
        destination[f"{prefix}state.seen"] = torch.tensor(state.seen)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        tag = f"{prefix}state."
        saved = {k[len(tag):]: v for k, v in state_dict.items() if k.startswith(tag)}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(tag)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.memory_state = _state_from_tensors(saved, self.neural_memory) if saved else None


def _state_from_tensors(saved: Dict[str, torch.Tensor], neural_memory):
    from ..layers.neural_memory import NeuralMemoryState

    depth = len(neural_memory.init_weights)

    def field(name, n):
        if f"{name}.0" not in saved and name != "pending":
            return None
        return tuple(saved.get(f"{name}.{i}") for i in range(n))

    return NeuralMemoryState(
        weights=field("weights", depth), momentum=field("momentum", depth),
        chunk_weights=field("chunk_weights", depth), chunk_momentum=field("chunk_momentum", depth),
        pending=field("pending", 5), conv_cache=saved.get("conv_cache"), seen=int(saved["seen"]),
    )


class DKVBLayer(_GatedLayer):
    """A decoder layer whose output passes through a Discrete Key-Value Bottleneck branch."""

    gate_name = "dkvb_gate"

    def __init__(self, base_layer: nn.Module, config: DKVBConfig, hidden: int, layer_index: int, shared):
        super().__init__(base_layer, hidden, layer_index, shared)
        if hidden % config.num_codebooks:
            raise ValueError(f"num_codebooks ({config.num_codebooks}) must divide the model's hidden size ({hidden})")
        from ..layers.dkvb import DiscreteKeyValueBottleneck

        p = next(base_layer.parameters())
        self.dkvb = DiscreteKeyValueBottleneck(
            hidden, config.num_codebooks, config.num_keys, key_dim=config.key_dim,
            value_dim=hidden // config.num_codebooks, top_k=config.top_k, splitter="random", decoder="none",
            backend=config.backend,
        ).to(p.device)

    def branch(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = self.dkvb(h.to(self.dkvb.values.dtype))  # [..., C, Dv]
        return out.flatten(-2)


def _build(cls, model, config, state: MemoryState) -> List[Slot]:
    decoder = state.family.layers(base_model(model))
    hidden = model.config.hidden_size
    slots = []
    for i in config.layers:
        # The layer may already be wrapped (another attachment): this wrapper goes around that one.
        wrapper = cls(state.current(decoder, str(i)), config, hidden, i, state)
        slots.append(Slot(parent=decoder, attr=str(i), wrapper=wrapper, layer=i))
    return slots


BUILDERS = {
    "titans": lambda model, config, state: _build(TitansLayer, model, config, state),
    "dkvb": lambda model, config, state: _build(DKVBLayer, model, config, state),
}
