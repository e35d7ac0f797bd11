"""``KNNAttention``: a model's attention module, wrapped PEFT-style, with a kNN memory of its past.

The wrapper keeps the original module as ``base_layer`` and runs it unchanged: the projections,
norms, rotary embedding and KV cache are the model's own. Only the attention function differs: the
registered ``memlayers_*`` function (see ``attention.py``) hands the call back to the wrapper's
``attend``, which

1. computes the local attention (the model's mask, the cache) with its log-sum-exp,
2. retrieves each query's ``top_k`` memories of this layer and batch row (search by the query
   before rotary embedding against keys stored before rotary embedding),
3. attends to them under the position policy (``"rotate"``: keys rotated at their stored
   positions; ``"none"``; ``"fixed"``) and merges both into one softmax (``joint``) or mixes them
   by a gate,
4. while ``memorize`` runs, stores the chunk's keys (rotary embedding undone) and values.

Rotary models apply RoPE before the attention function, which never sees ``cos``/``sin``: the
wrapper catches ``position_embeddings`` on its way into the base module.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ..memory import KNNMemory
from ..ops.memory_attention import memory_attention, merge_attention
from .attention import WRAPPERS, local_attention, rotate, unrotate
from .config import KNNMemoryConfig
from .state import BaseLayerWrapper


class KNNAttention(BaseLayerWrapper):
    """``base_layer`` (the model's attention module) plus a ``KNNMemory`` (``memory``, created by
    the first ``memorize``: its batch size is the input's) and, for ``combine="gate"``, ``gate``
    (one logit per query head, trainable)."""

    def __init__(self, base_layer: nn.Module, config: KNNMemoryConfig, layer_index: int,
                 q_heads: int, kv_heads: int, head_dim: int, shared):
        super().__init__()
        self.base_layer = base_layer
        self.memory_config = config
        self.layer_index = layer_index
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.register_module("memory", None)
        if config.combine == "gate":
            p = next(base_layer.parameters())
            self.gate = nn.Parameter(torch.full((q_heads,), float(config.gate_init), device=p.device, dtype=p.dtype))
        # Plain attributes (not submodules): the model-wide state, and what one forward call caught.
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "_signature", inspect.signature(base_layer.forward))
        self.in_call = False
        self._rotary = None
        WRAPPERS[base_layer] = self

    # ------------------------------------------------------------------ the memory
    def ensure_memory(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build the store for ``batch_size`` rows (kept when it already fits)."""
        cfg = self.memory_config
        dtype = getattr(torch, cfg.dtype) if cfg.dtype else dtype
        mem = self.memory
        if mem is not None and mem.batch_size == batch_size and mem.device == device and mem.dtype == dtype:
            return
        self.memory = KNNMemory(batch_size, self.kv_heads, self.head_dim, capacity=cfg.capacity,
                                backend=cfg.store, metric=cfg.metric, device=device, dtype=dtype,
                                search_backend=cfg.backend)

    def holds_memories(self) -> bool:
        # The host-side count of memorized tokens: no device sync per layer and step.
        return self.memory is not None and self.shared.max_offset > 0

    def prepare_load(self, tensors) -> None:
        """Build the store a saved state dict (``memory.*``) will load into."""
        if "memory.count" in tensors:
            self.ensure_memory(tensors["memory.count"].shape[0], tensors["memory.keys"].device,
                               tensors["memory.keys"].dtype)

    def reset_rows(self, rows: torch.Tensor) -> None:
        if self.memory is not None:
            self.memory.reset(rows.to(self.memory.device))

    def nbytes(self) -> int:
        return 0 if self.memory is None else self.memory.nbytes()

    # ------------------------------------------------------------------ forward
    def forward(self, *args, **kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        self._rotary = bound.get("position_embeddings")
        self.in_call = True
        try:
            return self.base_layer(*args, **kwargs)
        finally:
            self.in_call = False
            self._rotary = None

    def attend(self, base_fn, query, key, value, attention_mask, scaling=None, **kwargs):
        """The attention function for the base module (transformers' calling convention).

        query ``[B, Hq, T, D]`` (rotated), key/value ``[B, Hkv, S, D]`` (rotated, cache included).
        Returns ``(out [B, T, Hq, D], weights or None)``. With nothing memorized, the base
        implementation ``base_fn`` runs as it would without memlayers.
        """
        if self.holds_memories():
            scale = query.shape[-1] ** -0.5 if scaling is None else scaling
            out_l, lse_l = local_attention(query, key, value, attention_mask, scale,
                                           backend=self.memory_config.backend)
            out_m, lse_m = self._read(query, scale)
            result = self._combine(out_l, lse_l, out_m, lse_m).to(query.dtype).transpose(1, 2).contiguous(), None
        else:
            result = base_fn(self.base_layer, query, key, value, attention_mask, scaling=scaling, **kwargs)
        # Written after reading: a chunk attends to its own tokens locally (causally), never as memories.
        if self.shared.writing:
            self._write(key, value, query.shape[2])
        return result

    def _pre_rotary(self, x: torch.Tensor) -> torch.Tensor:
        if self._rotary is None:
            return x
        cos, sin = self._rotary
        return unrotate(x, cos, sin)

    def _read(self, query: torch.Tensor, scale: float):
        mem, cfg = self.memory, self.memory_config
        if query.shape[0] != mem.batch_size:
            raise ValueError(
                f"layer {self.layer_index}'s memory holds {mem.batch_size} batch rows but the input has "
                f"{query.shape[0]}; use the memorized batch (no beams or num_return_sequences > 1), or reset_memory"
            )
        q_pre = self._pre_rotary(query)
        hits = mem.search(q_pre.to(mem.dtype), cfg.top_k, gather=False)
        if self._rotary is None:  # no rotary embedding: keys are used as stored
            return memory_attention(query.to(mem.dtype), mem.keys, mem.values, hits.indices, scale=scale,
                                    backend=cfg.backend)
        if cfg.position == "none":
            return memory_attention(q_pre.to(mem.dtype), mem.keys, mem.values, hits.indices, scale=scale,
                                    backend=cfg.backend)
        if cfg.position == "fixed":
            # rope(q, p_q) . rope(k, p_k) = rope(q, p_q - p_k) . k: the query rotated by the distance.
            d = cfg.fixed_distance
            cos, sin = self.shared.positions.rotary_table(d + 1, torch.float32, query.device)
            q_fixed = rotate(q_pre.float(), cos[d], sin[d])
            return memory_attention(q_fixed.to(mem.dtype), mem.keys, mem.values, hits.indices, scale=scale,
                                    backend=cfg.backend)
        # rotate: stored positions are below the largest row offset.
        cos, sin = self.shared.positions.rotary_table(self.shared.max_offset, torch.float32, query.device)
        return memory_attention(query.to(mem.dtype), mem.keys, mem.values, hits.indices, scale=scale,
                                mem_positions=mem.positions, rotary_cos=cos, rotary_sin=sin, backend=cfg.backend)

    def _combine(self, out_l, lse_l, out_m, lse_m):
        if self.memory_config.combine == "joint":
            out, _ = merge_attention(out_l, lse_l, out_m.float(), lse_m)
            return out
        g = torch.sigmoid(self.gate.float())[None, :, None, None]
        # A query with no memory keeps its local output whole.
        g = torch.where(torch.isfinite(lse_m)[..., None], g, 0.0)
        return (1 - g) * out_l + g * out_m.float()

    def _write(self, key: torch.Tensor, value: torch.Tensor, T: int) -> None:
        if key.shape[2] != T:
            raise RuntimeError("memorize runs the model without a KV cache; got keys beyond the current chunk")
        mem = self.memory
        keys = self._pre_rotary(key).to(mem.dtype)
        mem.add(keys.contiguous(), value.to(mem.dtype).contiguous(), self.shared.write_positions)


__all__ = ["KNNAttention"]
