"""The attention function memlayers registers with transformers, and the local attention it computes.

transformers looks attention up by ``config._attn_implementation`` in ``AttentionInterface`` and the
causal mask by the same name in ``AttentionMaskInterface``. ``attach`` renames the model's
implementation ``"sdpa"`` to ``"memlayers_sdpa"`` (``"eager"`` to ``"memlayers_eager"``) and registers
both: the attention function, and the base implementation's mask function under the new name (a
name missing from the mask registry makes transformers build no mask at all: causal masking would
silently disappear).

The registered function serves every attention module of the model: a module wrapped by a kNN
attachment, while its wrapper runs, gets memory attention; every other one gets the base
implementation unchanged.
"""
from __future__ import annotations

import sys
import weakref
from typing import Optional, Tuple

import torch

from ..ops.local_attention import local_attention as causal_local_attention

PREFIX = "memlayers_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")

# base attention module -> the kNN wrapper around it (weak: a dropped model frees its entries).
WRAPPERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _base_function(base: str, module):
    if base == "sdpa":
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    # "eager" is no registry entry: each modeling file defines its own eager function.
    return sys.modules[type(module).__module__].eager_attention_forward


def _make_dispatch(base: str):
    def memlayers_attention(module, query, key, value, attention_mask, **kwargs):
        base_fn = _base_function(base, module)
        wrapper = WRAPPERS.get(module)
        if wrapper is not None and wrapper.in_call:
            return wrapper.attend(base_fn, query, key, value, attention_mask, **kwargs)
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    memlayers_attention.__name__ = f"{PREFIX}{base}_attention"
    return memlayers_attention


def register(base: str) -> str:
    """Register ``memlayers_<base>`` (attention and mask functions); returns that name."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"model's attn_implementation must be one of {BASE_IMPLEMENTATIONS} to attach kNN memory, got {base!r}; "
            "load it with attn_implementation='sdpa'"
        )
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = PREFIX + base
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_dispatch(base))
    if name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the local context, in fp32, with its log-sum-exp.

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` (Hq a multiple of Hkv), the last T of the S
            keys being the queries' own tokens.
        mask: transformers' mask for this layer: None (plain causal), bool ``[b, 1|Hq, T, S]`` (True
            attends) or additive float of that shape.
        scale: the score scale.
        backend: for a plain causal mask (None), the ``memlayers.ops.local_attention`` backend.

    Returns:
        ``(out [B, Hq, T, Dv] fp32, lse [B, Hq, T] fp32)``; a query that may attend to nothing gets
        ``out = 0, lse = -inf``.
    """
    if mask is None:  # plain causal over [cache, chunk]: the flash kernel (or its reference) serves
        out, lse = causal_local_attention(q, k, v, scale=scale, backend=backend)
        return out.float(), lse
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Query head h reads kv-head h // G: fold the group into the query rows instead of copying k, v.
    qf = q.float().reshape(B, Hkv, G * T, D)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).mul_(scale).view(B, Hq, T, S)
    if mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., -S:], float("-inf"))
    else:
        scores = scores + mask[..., -S:].float()
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])
    out = torch.matmul(probs.view(B, Hkv, G * T, S), v.float()).view(B, Hq, T, v.shape[-1])
    return out, torch.where(finite, lse, float("-inf"))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotary embedding ``x * cos + rotate_half(x) * sin`` (cos, sin broadcast against x)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo ``x * cos + rotate_half(x) * sin`` (HF's rotary embedding) for ``x [B, H, T, D]``.

    ``cos, sin [B|1, T, D]`` may carry an attention scaling ``s`` (``cos = s cos(theta)``), hence
    the division by ``cos^2 + sin^2 = s^2``.
    """
    cos = cos.unsqueeze(1).float()
    sin = sin.unsqueeze(1).float()
    xf = x.float()
    half = x.shape[-1] // 2
    # rotate_half(x) = cat(-x2, x1); rotating back by -theta uses cat(x2, -x1).
    back = torch.cat((xf[..., half:], -xf[..., :half]), dim=-1)
    return ((xf * cos + back * sin) / (cos * cos + sin * sin)).to(x.dtype)
