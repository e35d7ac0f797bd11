"""Rotary position embedding in the HuggingFace ``rotate_half`` convention.

``rope(x, p) = x * cos[p] + rotate_half(x) * sin[p]`` with ``cos[p] = cos(p * inv_freq)`` repeated over
both halves of the head dim, ``inv_freq[i] = base ** (-2i / D)``. The same tables feed
``memory_attention(rotary_cos=..., rotary_sin=...)``, which rotates stored keys on read.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..ops.memory_attention.naive import rotate_half


def rotary_tables(
    length: int,
    dim: int,
    base: float = 10000.0,
    device: Optional[Union[torch.device, str]] = None,
    dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
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


class RotaryCache:
    """Tables that grow (by doubling) to cover the largest position asked for, on one device.

    Example:
        >>> cache = RotaryCache(64)
        >>> cos, sin = cache.get(5000, torch.device("cpu"))
        >>> cos.shape[0] >= 5000
        True
    """

    def __init__(self, dim: int, base: float = 10000.0):
        self.dim, self.base = dim, base
        self.cos: Optional[torch.Tensor] = None
        self.sin: Optional[torch.Tensor] = None

    def get(self, length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Tables ``[P, dim]`` fp32 with ``P >= length`` (a power of two, at least 256)."""
        if self.cos is None or self.cos.shape[0] < length or self.cos.device != device:
            size = max(256, 1 << max(0, length - 1).bit_length())
            self.cos, self.sin = rotary_tables(size, self.dim, self.base, device=device)
        return self.cos, self.sin

    def at(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` at ``positions [B, T]`` -> ``[B, 1, T, dim]`` each (broadcast over heads)."""
        cos, sin = self.get(int(positions.max()) + 1 if positions.numel() else 1, positions.device)
        return cos[positions][:, None], sin[positions][:, None]
