"""``KNNMemoryAttention``: causal self-attention over the local segment plus the top-k (key, value)
pairs retrieved from a ``KNNMemory`` of past tokens (Memorizing Transformers; Extended Mind).

One call on a segment ``x [B, T, dim]``:
1. project to q, k, v (optional qk RMS-normalization); rotate q, k at their absolute positions;
2. local causal attention over the segment (and, with ``xl_memory``, the whole previous segment);
3. read the memory (``memlayers.layers.knn_read``, the read path the HuggingFace wrapper shares):
   search with the un-rotated queries (position-free similarity), attend over each query's top-k
   memories with the fused ``memory_attention`` kernel under the position policy (``"rotate"``,
   ``"none"``, ``"fixed"``), and merge with the local attention (``"joint"`` or ``"gate"``);
4. write the segment's (un-rotated) keys and values into the memory, detached from the graph.

The layer is a memory module (``memlayers.memory.protocol``): its memory (a ``KNNMemory``
submodule) and its Transformer-XL segment are buffers, so they are in ``state_dict`` (loadable at
another batch size) and move with ``.to()``. The memory is built by the first call (or
``bind_batch``) for the input's batch size, and reset per row at document boundaries with
``reset_memory(rows)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import KNNMemory
from ..memory.protocol import MemoryModule, row_mask
from ..ops.local_attention import local_attention
from ..ops.utils import FLOAT_DTYPES, check_choice, check_finite, check_positive_int, check_tensor
from ..ops.utils.guards import same_device
from .knn_read import (COMBINES, DEFAULT_CAPACITY, DEFAULT_FIXED_DISTANCE, DEFAULT_TOP_K, POSITIONS,
                       combine_memory, read_memory)
from .names import knn_backend, knn_index
from .rotary import RotaryCache, apply_rotary

# The Transformer-XL segment: keys (rotated), values, each row's first position, and whether a row has one.
_XL = ("xl_keys", "xl_values", "xl_start", "xl_valid")


class KNNMemoryAttention(nn.Module, MemoryModule):
    """Drop-in causal self-attention with a kNN memory of past keys and values.

    Args:
        dim: model width (input and output ``[B, T, dim]``).
        heads: query heads. kv_heads: key/value heads (default ``heads``; a divisor of it: grouped-query).
        head_dim: per-head width (default ``dim // heads``).
        top_k: memories retrieved per query and head.
        capacity: memory slots per batch row and kv-head (oldest evicted first).
        combine: ``"joint"`` (one softmax over local + memories) or ``"gate"`` (learned per-head gate).
        position: ``"none"``, ``"rotate"`` or ``"fixed"`` (``memlayers.layers.knn_read``); default
            ``"rotate"`` with rotary embedding, ``"none"`` without.
        rotary: rotary embedding on q, k (base ``rotary_base``).
        fixed_distance: the relative distance of every memory under ``position="fixed"``.
        qk_norm: RMS-normalize q and k per head before rotary embedding.
        xl_memory: also attend to the whole previous segment locally (Transformer-XL cache); its
            tokens are excluded from retrieval so that no key counts twice.
        xl_grad: keep the XL segment in the autograd graph (the caller then backpropagates through two
            segments at once); default False, stop-gradient as in Transformer-XL.
        index: the store's search: ``"exact"`` or a FAISS index ``"flat"``, ``"ivf"``, ``"hnsw"``.
        metric, index_options: passed to ``KNNMemory``.
        backend: the compute backend, ``"auto"``, ``"torch"`` or ``"triton"``, of ``memory_attention``,
            the local attention and the store's search.
        memory_backend, search_backend: deprecated spellings of ``index`` (``"exact"|"faiss"``) and
            of the store's compute backend.
        bias: biases in the projections. device, dtype: of the parameters.

    Defaults (``top_k``, ``capacity``, ``fixed_distance``) are those of ``KNNMemoryConfig`` too; see
    ``memlayers.layers.knn_read`` for why.

    Shapes: ``forward(x [B, T, dim]) -> [B, T, dim]``.

    Example:
        >>> import torch, memlayers as ml
        >>> attn = ml.KNNMemoryAttention(dim=256, heads=8, kv_heads=2, top_k=32, capacity=8192)
        >>> doc = torch.randn(2, 4096, 256)
        >>> outs = [attn(seg) for seg in doc.split(512, dim=1)]   # memory grows segment by segment
        >>> attn.reset_memory(rows=[0])                           # row 0 starts a new document
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        *,
        top_k: int = DEFAULT_TOP_K,
        capacity: int = DEFAULT_CAPACITY,
        combine: str = "joint",
        position: Optional[str] = None,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        fixed_distance: int = DEFAULT_FIXED_DISTANCE,
        qk_norm: bool = False,
        xl_memory: bool = False,
        xl_grad: bool = False,
        index: Optional[str] = None,
        metric: str = "ip",
        index_options: Optional[dict] = None,
        backend: str = "auto",
        bias: bool = False,
        device=None,
        dtype=None,
        memory_backend: Optional[str] = None,
        search_backend: Optional[str] = None,
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        kv_heads = heads if kv_heads is None else check_positive_int("kv_heads", kv_heads)
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when head_dim is not given")
            head_dim = dim // heads
        check_positive_int("head_dim", head_dim)
        check_positive_int("top_k", top_k)
        check_positive_int("capacity", capacity)
        check_positive_int("fixed_distance", fixed_distance, minimum=0)
        check_choice("combine", combine, COMBINES)
        position = ("rotate" if rotary else "none") if position is None else position
        check_choice("position", position, POSITIONS)
        if position != "none" and not rotary:
            raise ValueError(f"position={position!r} needs rotary=True (without rotary embedding use 'none')")
        if rotary and head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        check_choice("backend", backend, ("auto", "torch", "triton"))
        index = knn_index("KNNMemoryAttention", index, "memory_backend", memory_backend)
        backend, store_backend = knn_backend("KNNMemoryAttention", backend, search_backend)

        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.top_k, self.capacity, self.combine, self.position = top_k, capacity, combine, position
        self.rotary, self.fixed_distance, self.xl_memory, self.xl_grad = rotary, fixed_distance, xl_memory, xl_grad
        self.backend = backend
        self.scale = head_dim ** -0.5
        self.memory_kwargs = dict(index=index, metric=metric, index_options=index_options, backend=store_backend)

        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(dim, kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias, **factory)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6, **factory) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6, **factory) if qk_norm else None
        # sigmoid(0) = 1/2: memory and local context start equally weighted.
        self.gate = nn.Parameter(torch.zeros(heads, **factory)) if combine == "gate" else None
        self.rope = RotaryCache(head_dim, rotary_base) if rotary else None

        # The memory (built for the first batch) and the XL segment (after the first write with xl_memory).
        self.register_module("memory", None)
        for name in _XL:
            self.register_buffer(name, None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"top_k={self.top_k}, capacity={self.capacity}, combine={self.combine!r}, "
                f"position={self.position!r}, xl_memory={self.xl_memory}")

    # ------------------------------------------------------------------ state (the memory-state protocol)
    @property
    def memory_batch_size(self) -> Optional[int]:
        return None if self.memory is None else self.memory.memory_batch_size

    def setup_memory(self, batch_size: int, device=None, dtype=None) -> KNNMemory:
        """Build an empty memory for ``batch_size`` rows (default: the parameters' device and dtype).

        Called by the first ``forward``; call it again to change the batch size (drops the memory).
        """
        check_positive_int("batch_size", batch_size)
        weight = self.q_proj.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        self.memory = KNNMemory(batch_size, self.kv_heads, self.head_dim, capacity=self.capacity,
                                device=device, dtype=dtype, **self.memory_kwargs)
        self._clear_xl()
        return self.memory

    def bind_batch(self, batch_size: int) -> None:
        """Give the memory ``batch_size`` empty rows (the memory-state protocol's ``setup_memory``)."""
        self.setup_memory(batch_size)

    def _clear_xl(self) -> None:
        for name in _XL:
            setattr(self, name, None)

    @torch.no_grad()
    def reset_memory(self, rows=None) -> None:
        """Forget the chosen rows (None: all; row ids; or a ``[B]`` bool mask), e.g. at document starts.

        Their memory, positions and XL segment are cleared; other rows are untouched.
        """
        if self.memory is None:
            return
        mask = row_mask(rows, self.memory.batch_size, self.memory.device)  # validates before any change
        self.memory.reset_memory(mask)
        if self.xl_valid is not None:
            self.xl_valid = self.xl_valid & ~mask.to(self.xl_valid.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A saved memory or XL segment loads into a layer that has none yet (or one of another batch
        # size): make room of the saved shapes first; KNNMemory rebuilds its own buffers to fit.
        if self.memory is None and f"{prefix}memory.count" in state_dict:
            saved = state_dict[f"{prefix}memory.count"]
            # On the layer's device, wherever the checkpoint was read (load_state_dict copies across).
            self.setup_memory(saved.shape[0])
        for name in _XL:
            t = state_dict.get(prefix + name)
            if t is not None and (getattr(self, name) is None or getattr(self, name).shape != t.shape):
                setattr(self, name, torch.empty_like(t, device=self.q_proj.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @property
    def _next_pos(self) -> torch.Tensor:
        """``[B]`` the position of each row's next token."""
        return self.memory.next_position

    @torch.no_grad()
    def prefill_memory(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store precomputed tokens as each row's next positions, without attending (e.g. a corpus
        encoded elsewhere, or a benchmark's full memory).

        Args:
            keys: ``[B, kv_heads, T, head_dim]`` un-rotated (and, with qk_norm, normalized) keys.
            values: ``[B, kv_heads, T, head_dim]``.
        """
        if self.memory is None:
            check_tensor("keys", keys, ndim=4, dtypes=FLOAT_DTYPES)
            self.setup_memory(keys.shape[0], keys.device, keys.dtype)
        self.memory.add(keys, values)  # validates everything; positions continue each row

    # ------------------------------------------------------------------ forward
    def _check_input(self, x) -> None:
        check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
        if x.shape[2] != self.dim:
            raise ValueError(f"x must have shape (B, T, {self.dim}), got {tuple(x.shape)}")
        weight = self.q_proj.weight
        if x.dtype != weight.dtype:
            raise TypeError(f"x must have the layer's dtype {weight.dtype}, got {x.dtype}")
        if not same_device(x.device, weight.device):
            raise ValueError(f"x must be on the layer's device {weight.device}, got {x.device}")
        if self.memory is not None and self.memory.batch_size != x.shape[0]:
            raise ValueError(f"x has batch size {x.shape[0]} but the memory holds {self.memory.batch_size} rows; "
                             "call setup_memory(batch_size) to start a new memory")
        if self.memory is not None and (self.memory.dtype != x.dtype or not same_device(self.memory.device, x.device)):
            raise ValueError(f"x ({x.dtype}, {x.device}) does not match the memory ({self.memory.dtype}, "
                             f"{self.memory.device}); call setup_memory to rebuild it")
        check_finite("x", x)

    def _heads(self, proj: nn.Linear, x: torch.Tensor, heads: int) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, *, update_memory: bool = True) -> torch.Tensor:
        """Attend over the segment and the memory, then store the segment.

        Args:
            x: ``[B, T, dim]``, the layer's dtype and device, finite; the next T tokens of each row.
            update_memory: write the segment into the memory and advance positions (False: read only).

        Returns:
            ``[B, T, dim]``.
        """
        self._check_input(x)
        B, T, _ = x.shape
        if self.memory is None:
            self.setup_memory(B, x.device, x.dtype)
        mem = self.memory

        q = self._heads(self.q_proj, x, self.heads)
        k = self._heads(self.k_proj, x, self.kv_heads)
        v = self._heads(self.v_proj, x, self.kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        pos = self._next_pos[:, None] + torch.arange(T, device=x.device)  # [B, T]
        if self.rotary:
            cos, sin = self.rope.at(pos)
            q_rot, k_rot = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            q_rot, k_rot = q, k

        local_k, local_v, prefix_valid, xl_start = k_rot, v, None, None
        if self.xl_keys is not None:
            local_k = torch.cat((self.xl_keys, k_rot), dim=2)
            local_v = torch.cat((self.xl_values, v), dim=2)
            prefix_valid, xl_start = self.xl_valid, self.xl_start

        if self.combine == "joint":
            out, lse = local_attention(q_rot, local_k, local_v, scale=self.scale, prefix_valid=prefix_valid,
                                       backend=self.backend)
        else:
            out, lse = self._sdpa(q_rot, local_k, local_v, prefix_valid), None
        if T and mem.filled > 0:  # host-side: no device read to learn whether anything is stored
            mem_out, mem_lse = read_memory(
                mem, q, q_rot, top_k=self.top_k, scale=self.scale, position=self.position, rope=self.rope,
                fixed_distance=self.fixed_distance, backend=self.backend,
                max_position=int(self._next_pos.max()) + T, xl_start=xl_start, xl_valid=prefix_valid)
            out = combine_memory(out, lse, mem_out, mem_lse, self.combine, self.gate).to(out.dtype)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

        if update_memory and T:
            mem.add(k.detach(), v.detach(), positions=pos)
            if self.xl_memory:
                keep = (lambda t: t) if self.xl_grad else (lambda t: t.detach())
                self.xl_keys, self.xl_values = keep(k_rot), keep(v)
                self.xl_start = pos[:, 0].clone()
                self.xl_valid = torch.ones(B, dtype=torch.bool, device=x.device)
        return y

    def _sdpa(self, q, k, v, prefix_valid):
        """Local attention for the gate mode (no log-sum-exp needed): SDPA, causal after the prefix."""
        B, _, T, _ = q.shape
        S = k.shape[2]
        if self.heads != self.kv_heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if S == T:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        key = torch.arange(S, device=q.device)
        visible = key[None, :] <= torch.arange(T, device=q.device)[:, None] + (S - T)
        visible = visible[None] & ((key >= S - T)[None, None, :] | prefix_valid[:, None, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=self.scale)
