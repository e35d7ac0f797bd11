"""``KNNMemoryAttention``: causal self-attention over the local segment plus the top-k (key, value)
pairs retrieved from a ``KNNMemory`` of past tokens (Memorizing Transformers; Extended Mind).

One call on a segment ``x [B, T, dim]``:
1. project to q, k, v (optional qk RMS-normalization); rotate q, k at their absolute positions;
2. local causal attention over the segment (and, with ``xl_memory``, the whole previous segment);
3. search the memory with the un-rotated queries (position-free similarity), then attend over each
   query's top-k memories with the fused ``memory_attention`` kernel, under the position policy:
   - ``"none"``   memories carry no position (the paper, meliad): un-rotated query vs stored key;
   - ``"rotate"`` keys are stored before rotary and rotated on read at their stored positions
     (Extended Mind's cache): exactly the scores full attention would give them;
   - ``"fixed"``  every memory sits at one relative distance ``fixed_distance`` (InfLLM); by RoPE's
     relative property this is the query rotated at that distance against the stored key;
4. combine: ``"joint"`` one softmax over local and memory keys (log-sum-exp merge, exact), or
   ``"gate"`` separate softmaxes mixed per head by a learned sigmoid gate (the paper's mode);
5. write the segment's (un-rotated) keys and values into the memory, detached from the graph.

The memory is runtime state, not a weight: it is built on the first call for that batch size (or by
``setup_memory``) on the input's device, lives beside the parameters (not in ``state_dict``, not
moved by ``.to()``: call ``setup_memory`` after moving the layer), and is reset per row at document
boundaries with ``reset_memory(rows)``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..memory import KNNMemory
from ..ops.local_attention import local_attention
from ..ops.memory_attention import memory_attention, merge_attention
from ..ops.utils import FLOAT_DTYPES, check_choice, check_finite, check_positive_int, check_tensor
from ..ops.utils.guards import same_device
from .rotary import RotaryCache, apply_rotary

COMBINES = ("joint", "gate")
POSITIONS = ("none", "rotate", "fixed")


class KNNMemoryAttention(nn.Module):
    """Drop-in causal self-attention with a kNN memory of past keys and values.

    Args:
        dim: model width (input and output ``[B, T, dim]``).
        heads: query heads. kv_heads: key/value heads (default ``heads``; a divisor of it: grouped-query).
        head_dim: per-head width (default ``dim // heads``).
        top_k: memories retrieved per query and head.
        capacity: memory slots per batch row and kv-head (oldest evicted first).
        combine: ``"joint"`` (one softmax over local + memories) or ``"gate"`` (learned per-head gate).
        position: ``"none"``, ``"rotate"`` or ``"fixed"`` (module docstring); default ``"rotate"``
            with rotary embedding, ``"none"`` without.
        rotary: rotary embedding on q, k (base ``rotary_base``).
        fixed_distance: the relative distance of every memory under ``position="fixed"``.
        qk_norm: RMS-normalize q and k per head before rotary embedding.
        xl_memory: also attend to the whole previous segment locally (Transformer-XL cache); its
            tokens are excluded from retrieval so that no key counts twice.
        xl_grad: keep the XL segment in the autograd graph (the caller then backpropagates through two
            segments at once); default False, stop-gradient as in Transformer-XL.
        memory_backend, metric, index, index_options, search_backend: passed to ``KNNMemory``
            (``backend``, ``metric``, ``index``, ``index_options``, ``search_backend``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for ``memory_attention``.
        bias: biases in the projections. device, dtype: of the parameters.

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
        top_k: int = 32,
        capacity: int = 4096,
        combine: str = "joint",
        position: Optional[str] = None,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        fixed_distance: int = 1024,
        qk_norm: bool = False,
        xl_memory: bool = False,
        xl_grad: bool = False,
        memory_backend: str = "exact",
        metric: str = "ip",
        index: str = "flat",
        index_options: Optional[dict] = None,
        search_backend: str = "auto",
        backend: str = "auto",
        bias: bool = False,
        device=None,
        dtype=None,
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

        self.dim, self.heads, self.kv_heads, self.head_dim = dim, heads, kv_heads, head_dim
        self.top_k, self.capacity, self.combine, self.position = top_k, capacity, combine, position
        self.rotary, self.fixed_distance, self.xl_memory, self.xl_grad = rotary, fixed_distance, xl_memory, xl_grad
        self.backend = backend
        self.scale = head_dim ** -0.5
        self.memory_kwargs = dict(backend=memory_backend, metric=metric, index=index,
                                  index_options=index_options, search_backend=search_backend)

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

        # Runtime state, not weights: kept in a plain dict so that it stays out of state_dict() and
        # weights load into a layer whatever its memory holds. setup_memory builds it.
        self._state = {"memory": None}
        self._next_pos: Optional[torch.Tensor] = None  # [B] position of each row's next token
        self._xl = None  # previous segment: dict(k_rot, v, start [B], valid [B])

    @property
    def memory(self) -> Optional[KNNMemory]:
        """The ``KNNMemory`` (None before the first call); save it with ``layer.memory.save(path)``."""
        return self._state["memory"]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"top_k={self.top_k}, capacity={self.capacity}, combine={self.combine!r}, "
                f"position={self.position!r}, xl_memory={self.xl_memory}")

    # ------------------------------------------------------------------ state
    def setup_memory(self, batch_size: int, device=None, dtype=None) -> KNNMemory:
        """Build an empty memory for ``batch_size`` rows (default: the parameters' device and dtype).

        Called by the first ``forward``; call it again to change the batch size (drops the memory).
        """
        check_positive_int("batch_size", batch_size)
        weight = self.q_proj.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        self._state["memory"] = KNNMemory(batch_size, self.kv_heads, self.head_dim, capacity=self.capacity,
                                          device=device, dtype=dtype, **self.memory_kwargs)
        self._next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._xl = None
        return self.memory

    @torch.no_grad()
    def reset_memory(self, rows=None) -> None:
        """Forget the chosen rows (None: all; row ids; or a ``[B]`` bool mask), e.g. at document starts.

        Their memory, positions and XL segment are cleared; other rows are untouched.
        """
        if self.memory is None:
            return
        self.memory.reset(rows)  # validates rows before changing anything
        B = self.memory.batch_size
        if rows is None:
            mask = torch.ones(B, dtype=torch.bool)
        elif isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
            mask = rows.cpu()
        else:
            mask = torch.zeros(B, dtype=torch.bool)
            mask[torch.as_tensor(rows, dtype=torch.long).reshape(-1).cpu()] = True
        mask = mask.to(self._next_pos.device)
        self._next_pos.masked_fill_(mask, 0)
        if self._xl is not None:
            self._xl["valid"] = self._xl["valid"] & ~mask

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
        T = keys.shape[2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
        pos = self._next_pos[:, None] + torch.arange(T, device=self._next_pos.device)
        self.memory.add(keys, values, positions=pos)  # validates everything before writing
        self._next_pos += T

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
        if self._xl is not None:
            local_k = torch.cat((self._xl["k_rot"], k_rot), dim=2)
            local_v = torch.cat((self._xl["v"], v), dim=2)
            prefix_valid, xl_start = self._xl["valid"], self._xl["start"]

        mem_out, mem_lse = self._read_memory(q, q_rot, xl_start, prefix_valid) if T else (None, None)
        if self.combine == "joint":
            out, lse = local_attention(q_rot, local_k, local_v, scale=self.scale, prefix_valid=prefix_valid,
                                       backend=self.backend)
            if mem_out is not None:
                out, _ = merge_attention(out, lse, mem_out, mem_lse)
        else:
            out = self._sdpa(q_rot, local_k, local_v, prefix_valid)
            if mem_out is not None:
                g = torch.sigmoid(self.gate.float()).view(1, -1, 1, 1)
                mixed = (g * mem_out.float() + (1 - g) * out.float()).to(out.dtype)
                # A query with no memory at all keeps its local output.
                out = torch.where(torch.isfinite(mem_lse)[..., None], mixed, out)
        y = self.o_proj(out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))

        if update_memory and T:
            mem.add(k.detach(), v.detach(), positions=pos)
            self._next_pos += T
            if self.xl_memory:
                keep = (lambda t: t) if self.xl_grad else (lambda t: t.detach())
                self._xl = dict(k_rot=keep(k_rot), v=keep(v), start=pos[:, 0].clone(),
                                valid=torch.ones(B, dtype=torch.bool, device=x.device))
        return y

    def _read_memory(self, q, q_rot, xl_start, xl_valid):
        """Top-k retrieval and fused attention: -> (out [B, H, T, hd], lse [B, H, T]) or (None, None)."""
        mem = self.memory
        if int(mem.count.max()) == 0:
            return None, None
        res = mem.search(q.detach(), self.top_k, gather=False)
        indices = res.indices
        if xl_start is not None:
            # Tokens of the XL segment are in the local context already: never count them twice.
            in_xl = (res.positions >= xl_start[:, None, None, None]) & xl_valid[:, None, None, None]
            indices = indices.masked_fill(in_xl, -1)
        kwargs = {}
        if self.position == "rotate":
            cos, sin = self.rope.get(int(self._next_pos.max()) + q.shape[2], q.device)
            kwargs = dict(mem_positions=mem.positions, rotary_cos=cos, rotary_sin=sin)
            q_mem = q_rot
        elif self.position == "fixed":
            cos, sin = self.rope.get(self.fixed_distance + 1, q.device)
            d = self.fixed_distance
            q_mem = apply_rotary(q, cos[d], sin[d])
        else:
            q_mem = q
        return memory_attention(q_mem, mem.keys, mem.values, indices, scale=self.scale, backend=self.backend,
                                **kwargs)

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
