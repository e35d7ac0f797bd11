"""``KNNAttention``: a model's attention module, wrapped PEFT-style, with a kNN memory of its past.

The wrapper keeps the original module as ``base_layer`` and runs it unchanged: the projections,
norms, rotary embedding and KV cache are the model's own. Only the attention function differs: the
wrapper calls the base module with ``memlayers_knn=self`` and the registered ``memlayers_*`` function
(see ``attention.py``) hands that call back to the wrapper's ``attend``, which

1. computes the local attention (the model's mask, the cache) with its log-sum-exp,
2. reads this layer's memory of the batch row through ``memlayers.layers.knn_read`` (the read path
   ``ml.KNNMemoryAttention`` uses: search by the query before rotary embedding against keys stored
   before rotary embedding, position policy, joint or gate merge),
3. while ``memorize`` runs, stores the chunk's keys (rotary embedding undone) and values; inside a
   ``writing(model)`` block (``memorize.py``) it keeps them in ``recorded`` instead, and the block's
   end stores them: a ``generate`` reads the memory as it was when it started.

Rotary models apply RoPE before the attention function, which never sees ``cos``/``sin``: the
wrapper passes on the ``position_embeddings`` its base module receives (the second parameter of
every supported rotary family's attention module).
"""
from __future__ import annotations

import torch
from torch import nn

from ..layers.knn_read import combine_memory, read_memory
from ..layers.rotary import unrotate
from ..memory import KNNMemory
from .attention import local_attention
from .config import KNNMemoryConfig
from .state import BaseLayerWrapper


class KNNAttention(BaseLayerWrapper):
    """``base_layer`` (the model's attention module) plus a ``KNNMemory`` (``memory``, created by
    the first ``memorize``: its batch size is the input's) and, for ``combine="gate"``, ``gate``
    (one logit per query head, trainable).

    ``positions`` is the model's ``PositionShift`` (a plain reference, not a submodule: it is the
    model's, saved once); ``writing`` is set by ``memorize`` while it runs; ``recorded`` is a list
    of ``(keys before rotary embedding, values)`` pieces ``[B, Hkv, T, D]`` while a ``writing(model)``
    block is open (None otherwise).
    """

    attachment_kind = "knn"

    def __init__(self, base_layer: nn.Module, config: KNNMemoryConfig, layer_index: int,
                 q_heads: int, kv_heads: int, head_dim: int, positions: nn.Module, rotary: bool):
        super().__init__()
        self.base_layer = base_layer
        self.memory_config = config
        self.layer_index = layer_index
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.rotary = rotary
        self.max_distance = _max_distance(config, base_layer)
        self.writing = False
        self.recorded = None
        self.register_module("memory", None)
        if config.combine == "gate":
            p = next(base_layer.parameters())
            self.gate = nn.Parameter(torch.full((q_heads,), float(config.gate_init), device=p.device, dtype=p.dtype))
        else:
            self.gate = None
        object.__setattr__(self, "positions", positions)
        self.train(base_layer.training)  # the model's mode: an eval model gets an eval wrapper

    # ------------------------------------------------------------------ the memory
    def ensure_memory(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build the store for ``batch_size`` rows (kept when it already fits)."""
        cfg = self.memory_config
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else dtype
        mem = self.memory
        if mem is not None and mem.batch_size == batch_size and mem.device == device and mem.dtype == dtype:
            return
        self.memory = KNNMemory(batch_size, self.kv_heads, self.head_dim, capacity=cfg.capacity,
                                index=cfg.index, metric=cfg.metric, backend=cfg.backend, device=device, dtype=dtype,
                                process_group=cfg.process_group)
        self.memory.train(self.training)

    def holds_memories(self) -> bool:
        # The store's host-side high-water mark: no device read per layer and step.
        return self.memory is not None and self.memory.filled > 0

    def prepare_load(self, tensors) -> None:
        """Build the store a saved state dict (``memory.*``) will load into."""
        if "memory.count" in tensors:
            self.ensure_memory(tensors["memory.count"].shape[0], tensors["memory.keys"].device,
                               tensors["memory.keys"].dtype)

    def nbytes(self) -> int:
        return 0 if self.memory is None else self.memory.nbytes()

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        rotary = None
        if self.rotary:  # attention(hidden_states, position_embeddings, ...)
            rotary = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
        return self.base_layer(*args, memlayers_knn=self, memlayers_rotary=rotary, **kwargs)

    def attend(self, base_fn, module, query, key, value, attention_mask, rotary, scaling=None, **kwargs):
        """The attention function for the base module (transformers' calling convention).

        query ``[B, Hq, T, D]`` (rotated), key/value ``[B, Hkv, S, D]`` (rotated, cache included),
        ``rotary``: the ``(cos, sin)`` ``[B|1, T, D]`` they were rotated by (None: no rotary
        embedding). Returns ``(out [B, T, Hq, D], weights or None)``. With nothing memorized, the
        base implementation ``base_fn`` runs as it would without memlayers.
        """
        if self.holds_memories():
            cfg, mem = self.memory_config, self.memory
            if query.shape[0] != mem.batch_size:
                raise ValueError(
                    f"layer {self.layer_index}'s memory holds {mem.batch_size} batch rows but the input has "
                    f"{query.shape[0]}; use the memorized batch (no beams or num_return_sequences > 1), or reset_memory"
                )
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            out_l, lse_l = local_attention(query, key, value, attention_mask, scale, backend=cfg.backend)
            positions = self.positions
            in_context = {}
            if self.writing and key.shape[2] > query.shape[2]:
                # memorize's local context (the cache) holds the memorized tokens from offset - cached
                # on: they are read locally, not again from the memory.
                cached = key.shape[2] - query.shape[2]
                in_context = dict(xl_start=positions.offset - cached,
                                  xl_valid=torch.ones_like(positions.offset, dtype=torch.bool))
            out_m, lse_m = read_memory(
                mem, _pre_rotary(query, rotary), query, top_k=cfg.top_k, scale=scale, position=cfg.position,
                rope=positions.rope if rotary is not None else None, fixed_distance=cfg.fixed_distance,
                backend=cfg.backend, max_position=positions.memorized, max_distance=self.max_distance, **in_context)
            out = combine_memory(out_l, lse_l, out_m, lse_m, cfg.combine, self.gate)
            result = out.to(query.dtype).transpose(1, 2).contiguous(), None
        else:
            result = base_fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # Written after reading: a chunk attends to its own tokens locally (causally), never as memories.
        T = query.shape[2]
        if self.writing:
            # memorize's keys hold its local context (the cache) first: this chunk's tokens are the last T.
            self.store(_pre_rotary(key[:, :, -T:], rotary), value[:, :, -T:])
        elif self.recorded is not None:
            # A decode step's key/value hold the cache too; this step's tokens are the last T. Copies:
            # a view would keep each step's whole cache tensor alive (quadratic memory in the length).
            self.recorded.append((_pre_rotary(key[:, :, -T:], rotary).clone(), value[:, :, -T:].clone()))
        return result

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``keys`` (before rotary embedding) and ``values`` ``[B, Hkv, T, D]`` at the positions
        that follow each row's memorized tokens (``positions.offset``; the caller advances it)."""
        mem = self.memory
        T = keys.shape[2]
        offset = self.positions.offset
        positions = offset[:, None] + torch.arange(T, device=offset.device)  # [B, T] absolute positions
        mem.add(keys.to(mem.dtype).contiguous(), values.to(mem.dtype).contiguous(), positions)


def _max_distance(config: KNNMemoryConfig, base_layer: nn.Module) -> int:
    """``config.max_distance``, or for None half the positions the model was trained on (its config's
    ``max_position_embeddings``; 0, no limit, where it names none)."""
    if config.max_distance is not None:
        return config.max_distance
    trained = getattr(getattr(base_layer, "config", None), "max_position_embeddings", None)
    return trained // 2 if isinstance(trained, int) and trained > 1 else 0


def _pre_rotary(x: torch.Tensor, rotary) -> torch.Tensor:
    """``x [B, H, T, D]`` before the rotary embedding ``rotary = (cos, sin) [B|1, T, D]`` (None: as is)."""
    if rotary is None:
        return x
    cos, sin = rotary
    return unrotate(x, cos.unsqueeze(1), sin.unsqueeze(1))


__all__ = ["KNNAttention"]
