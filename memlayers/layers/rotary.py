"""Rotary position embedding in the HuggingFace ``rotate_half`` convention: the one rotary module.

``rope(x, p) = x * cos[p] + rotate_half(x) * sin[p]``. ``KNNMemoryAttention`` builds its tables with
``rotary_tables`` (``cos[p] = cos(p * inv_freq)`` repeated over both halves of the head dim,
``inv_freq[i] = base ** (-2i / D)``); the HuggingFace integration builds them with the model's own
rotary embedding module (which may scale frequencies or carry an attention scaling). Either way the
tables live in one ``RotaryCache`` and feed ``memory_attention(rotary_cos=..., rotary_sin=...)``,
which rotates stored keys on read.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from ..ops.memory_attention.naive import rotate_half

Tables = Tuple[torch.Tensor, torch.Tensor]


def rotary_tables(
    length: int,
    dim: int,
    base: float = 10000.0,
    device: Optional[Union[torch.device, str]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tables:
    """``(cos, sin)``, each ``[length, dim]``, for positions ``0..length-1`` (computed in fp64).

    Example:
        >>> cos, sin = rotary_tables(2048, 64)
        >>> cos.shape
        torch.Size([2048, 64])
    """
    if dim % 2:
        raise ValueError(f"rotary embedding needs an even dim, got {dim}")
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    angles = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by ``cos``/``sin`` broadcastable to it (e.g. ``[B, 1, T, D]``).

    Computed in fp32, returned in x's dtype.

    Example:
        >>> cos, sin = rotary_tables(16, 8)
        >>> apply_rotary(torch.randn(1, 2, 16, 8), cos[None, None], sin[None, None]).shape
        torch.Size([1, 2, 16, 8])
    """
    xf = x.float()
    return (xf * cos.float() + rotate_half(xf) * sin.float()).to(x.dtype)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo ``apply_rotary``: ``x [B, H, T, D]`` back to before the rotation, ``cos``/``sin``
    broadcastable to it.

    The tables may carry an attention scaling ``s`` (``cos = s cos(theta)``, as some HuggingFace
    rotary embeddings do), hence the division by ``cos^2 + sin^2 = s^2``. Computed in fp32, returned
    in x's dtype.
    """
    cos, sin, xf = cos.float(), sin.float(), x.float()
    # rotate_half(x) = cat(-x2, x1); rotating back by -theta uses -rotate_half(x) = cat(x2, -x1).
    return ((xf * cos - rotate_half(xf) * sin) / (cos * cos + sin * sin)).to(x.dtype)


class RotaryCache:
    """Tables for positions ``0..P-1`` that grow (by doubling) to cover the largest position asked
    for, on one device; rebuilt when asked for another device.

    Args:
        dim: the head dim (even).
        base: the frequency base of ``rotary_tables``.
        tables: optional ``fn(length, device) -> (cos, sin)`` that makes the tables instead (e.g. a
            HuggingFace model's rotary embedding).

    Example:
        >>> cache = RotaryCache(64)
        >>> cos, sin = cache.get(5000, torch.device("cpu"))
        >>> cos.shape[0] >= 5000
        True
    """

    def __init__(self, dim: int, base: float = 10000.0, tables: Optional[Callable[[int, torch.device], Tables]] = None):
        self.dim, self.base = dim, base
        self._make = tables or (lambda length, device: rotary_tables(length, dim, base, device=device))
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None

    @torch.no_grad()
    def get(self, length: int, device: torch.device) -> Tables:
        """Tables ``[P, dim]`` fp32 with ``P >= length`` (a power of two, at least 256)."""
        device = torch.device(device)
        if self.cos is None or self.cos.shape[0] < length or self.cos.device != device:
            size = max(256, 1 << max(0, length - 1).bit_length())
            cos, sin = self._make(size, device)
            self.cos, self.sin = cos.float(), sin.float()
        return self.cos, self.sin

    def clear(self) -> None:
        """Drop the tables (e.g. when the module that makes them moved or changed)."""
        self.cos = self.sin = None

    def at(self, positions: torch.Tensor) -> Tables:
        """``cos``/``sin`` at ``positions [B, T]`` -> ``[B, 1, T, dim]`` each (broadcast over heads)."""
        cos, sin = self.get(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        return cos[positions][:, None], sin[positions][:, None]
