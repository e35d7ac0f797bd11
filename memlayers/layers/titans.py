"""Titans blocks: memory as a context (MAC), as a gate (MAG), as a layer (MAL).

Each block is pre-norm attention + the ``NeuralMemory`` long-term memory + a feed-forward, with
learnable persistent memory tokens (task knowledge independent of the input), as in "Titans:
Learning to Memorize at Test Time". Attention here is exact PyTorch SDPA with explicit masks; the
memory runs on the Triton kernels when its inputs are on CUDA. A call processes one whole sequence
``x [B, T, dim] -> [B, T, dim]``, starting from the learned initial memory.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.ops.utils import check_finite, check_positive_int, check_tensor

from memlayers.layers.neural_memory import NeuralMemory


class _Attention(nn.Module):
    """Multi-head attention of queries ``xq [B, Tq, dim]`` over ``xkv [B, Tk, dim]`` with a bool mask."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, Tq, D = xq.shape

        def split(t):
            return t.view(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)

        k, v = self.to_kv(xkv).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split(self.to_q(xq)), split(k), split(v), attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(B, Tq, D))


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.RMSNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


def _sliding_window_mask(n_persist: int, T: int, window: int, device) -> torch.Tensor:
    """``[n_persist + T]^2`` bool: causal within ``window`` tokens; persistent tokens always visible."""
    L = n_persist + T
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return (j < n_persist) | ((j <= i) & (j > i - window))


class _TitansBase(nn.Module):
    def __init__(self, dim, heads, n_persist, memory_heads, memory_kwargs):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        check_positive_int("n_persist", n_persist, minimum=0)
        self.dim, self.n_persist = dim, n_persist
        self.persistent = nn.Parameter(torch.randn(n_persist, dim) * 0.02)
        self.attn_norm = nn.RMSNorm(dim)
        self.attn = _Attention(dim, heads)
        self.mem_norm = nn.RMSNorm(dim)
        self.memory = NeuralMemory(dim, heads=memory_heads or heads, **(memory_kwargs or {}))
        self.ff = _FeedForward(dim)

    def _check(self, x: torch.Tensor) -> None:
        check_tensor("x", x, ndim=3, dtypes=(self.persistent.dtype,), device=self.persistent.device)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, T, {self.dim}], got {tuple(x.shape)}")
        check_finite("x", x)

    def _with_persistent(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.persistent.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


class _WindowedTitansBase(_TitansBase):
    """MAG and MAL: sliding-window attention over ``[persistent tokens, x]``."""

    def __init__(self, dim: int, heads: int = 4, window: int = 128, n_persist: int = 4,
                 memory_heads: Optional[int] = None, memory_kwargs: Optional[dict] = None):
        super().__init__(dim, heads, n_persist, memory_heads, memory_kwargs)
        self.window = check_positive_int("window", window)

    def _window_attention(self, h: torch.Tensor) -> torch.Tensor:
        """``h + attn(norm(h))`` for ``h [B, n_persist + T, dim]``, window-masked."""
        mask = _sliding_window_mask(self.n_persist, h.shape[1] - self.n_persist, self.window, h.device)
        a = self.attn_norm(h)
        return h + self.attn(a, a, mask)


class TitansMAC(_TitansBase):
    """Memory as a Context (Titans, section 4.1).

    The sequence is split into segments. For segment ``S``: (1) the long-term memory is read with
    the segment's queries *before* anything else, ``h = M_{t-1}(q)`` (no update); (2) attention runs
    over ``[persistent tokens, h, S]`` (causal: token ``i`` sees all persistent tokens, ``h_{<=i}``,
    ``S_{<=i}``); (3) the attention output ``y`` updates the memory, which is then read again,
    ``o = y * sigmoid(M_t(y))`` (the paper's ``y ⊗ M*_t(y)``), followed by the feed-forward.

    Args:
        dim, heads: model width and attention heads.
        segment_len: attention segment length (a multiple of the memory's chunk size keeps chunks aligned).
        n_persist: persistent memory tokens.
        memory_heads: NeuralMemory heads (default: ``heads``); ``memory_kwargs`` go to NeuralMemory.

    Shapes: ``x [B, T, dim] -> [B, T, dim]``.

    Example:
        >>> import torch, memlayers as ml
        >>> block = ml.TitansMAC(dim=64, heads=4, segment_len=32, memory_kwargs=dict(chunk_size=16))
        >>> block(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def __init__(self, dim: int, heads: int = 4, segment_len: int = 128, n_persist: int = 4,
                 memory_heads: Optional[int] = None, memory_kwargs: Optional[dict] = None):
        super().__init__(dim, heads, n_persist, memory_heads, memory_kwargs)
        self.segment_len = check_positive_int("segment_len", segment_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        B, T, _ = x.shape
        if T == 0:  # no segment at all: an empty output
            return x.new_zeros(x.shape)
        P = self.persistent.unsqueeze(0).expand(B, -1, -1)
        state, outs = None, []
        for start in range(0, T, self.segment_len):
            seg = x[:, start:start + self.segment_len]
            n = seg.shape[1]
            h = self.memory.read(self.mem_norm(seg), state)
            ctx = self.attn_norm(torch.cat([P, h, seg], dim=1))
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = torch.cat([causal.new_ones(n, self.n_persist), causal, causal], dim=1)
            y = seg + self.attn(ctx[:, self.n_persist + n:], ctx, mask)
            m, state = self.memory(self.mem_norm(y), state, return_state=True)
            o = y * torch.sigmoid(m)
            outs.append(o + self.ff(o))
        return torch.cat(outs, dim=1)


class TitansMAG(_WindowedTitansBase):
    """Memory as a Gate (Titans, section 4.2).

    Two branches read ``[persistent tokens, x]``: sliding-window attention (window ``window``;
    persistent tokens always visible) and the neural memory (learning from every token). They are
    combined by a gate, ``o = y ⊗ sigmoid(M(x))`` with ``y`` the attention branch (normalized
    inputs, learnable norm weights as in the paper), then the feed-forward.

    Shapes: ``x [B, T, dim] -> [B, T, dim]``.

    Example:
        >>> import torch, memlayers as ml
        >>> block = ml.TitansMAG(dim=64, heads=4, window=32, memory_kwargs=dict(chunk_size=16))
        >>> block(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        xt = self._with_persistent(x)
        y = self._window_attention(xt)
        m = self.memory(self.mem_norm(xt), return_state=False)
        o = (y * torch.sigmoid(m))[:, self.n_persist:]
        return o + self.ff(o)


class TitansMAL(_WindowedTitansBase):
    """Memory as a Layer (Titans, section 4.3).

    The neural memory reads ``[persistent tokens, x]`` first (compressing the past into its
    weights, output added to the residual stream); sliding-window attention (window ``window``,
    persistent tokens always visible) then runs on the memory layer's output, then the feed-forward.

    Shapes: ``x [B, T, dim] -> [B, T, dim]``.

    Example:
        >>> import torch, memlayers as ml
        >>> block = ml.TitansMAL(dim=64, heads=4, window=32, memory_kwargs=dict(chunk_size=16))
        >>> block(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        xt = self._with_persistent(x)
        m = self.memory(self.mem_norm(xt), return_state=False)
        y = self._window_attention(xt + m)[:, self.n_persist:]
        return y + self.ff(y)


__all__ = ["TitansMAC", "TitansMAG", "TitansMAL"]
