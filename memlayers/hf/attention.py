"""The attention functions memlayers registers with transformers, and the local attention it computes.

``attach`` registers ``memlayers_sdpa`` (for a model on ``"sdpa"``) or ``memlayers_eager_<family>``
(on ``"eager"``) with ``AttentionInterface.register``, registers the base implementation's mask
function under the same name with ``AttentionMaskInterface.register`` (a name missing from the mask
registry makes transformers build no mask at all: causal masking would silently disappear), and
switches the model with ``model.set_attn_implementation``; ``detach`` switches it back.

Dispatch is per instance, with no registry of wrappers and no flags: a kNN wrapper calls its base
attention module with the keyword ``memlayers_knn=<the wrapper>`` (and ``memlayers_rotary``, the
``(cos, sin)`` the module received), which the module passes on to the attention function with its
other keywords. The function hands such a call to the wrapper's ``attend``; every other call (a module
no kNN wrapper owns) goes to the base implementation unchanged. Nothing here is global state that
changes while the model runs, so ``torch.compile(model)`` traces it.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from ..ops.local_attention import local_attention as causal_local_attention
from ..ops.utils import resolve_backend

PREFIX = "memlayers_"
BASE_IMPLEMENTATIONS = ("sdpa", "eager")


def implementation_name(base: str, family) -> str:
    """The registered name for a model of ``family`` whose own implementation is ``base``."""
    if base not in BASE_IMPLEMENTATIONS:
        raise ValueError(
            f"model's attn_implementation must be one of {BASE_IMPLEMENTATIONS} to attach kNN memory, got {base!r}; "
            "load it with attn_implementation='sdpa'"
        )
    # "eager" is no registry entry: each modeling file has its own eager function (the family's).
    return PREFIX + ("sdpa" if base == "sdpa" else f"eager_{family.name}")


def base_implementation(name: str) -> Optional[str]:
    """The model's own implementation behind a memlayers name (None for any other name)."""
    if not name or not name.startswith(PREFIX):
        return None
    return "sdpa" if name == PREFIX + "sdpa" else "eager"


def _base_function(base: str, family) -> Callable:
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return family.eager()


@functools.lru_cache(maxsize=None)
def _dispatch(base: str, family) -> Callable:
    base_fn = _base_function(base, family)

    def memlayers_attention(module, query, key, value, attention_mask, memlayers_knn=None, memlayers_rotary=None,
                            **kwargs):
        if memlayers_knn is None:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        return memlayers_knn.attend(base_fn, module, query, key, value, attention_mask, memlayers_rotary, **kwargs)

    memlayers_attention.__name__ = implementation_name(base, family)
    return memlayers_attention


def register(base: str, family) -> str:
    """Register the memlayers attention and mask functions for ``base`` and ``family``; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = implementation_name(base, family)
    AttentionInterface.register(name, _dispatch(base, family))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
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
    if mask is None:
        if q.shape[2] == 1 and resolve_backend(backend, q, k, v, op="local_attention") == "torch":
            return _last_query(q, k, v, scale)
        # plain causal over [cache, chunk]: the flash kernel (or its reference) serves
        out, lse = causal_local_attention(q, k, v, scale=scale, backend=backend)
        return out.float(), lse
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Query head h reads kv-head h // G: fold the group into the query rows instead of copying k, v.
    qf = q.float().reshape(B, Hkv, G * T, D)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).mul_(scale).view(B, Hq, T, S)
    # In place: the score block (9 x 512 x 1024 floats in a SmolLM2 memorize chunk) is written once,
    # not once per step into fresh memory; no step's backward needs what the next overwrites.
    if mask.dtype == torch.bool:
        scores.masked_fill_(~mask[..., -S:], float("-inf"))
    else:
        scores.add_(mask[..., -S:].float())
    # Shifted by each row's maximum (a constant: no gradient, the softmax does not depend on it), then
    # normalized after the product with v: three passes over the scores where logsumexp and a second
    # exp took six.
    m = torch.nan_to_num(scores.detach().amax(dim=-1, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)
    probs = scores.sub_(m).exp_()
    total = probs.sum(dim=-1)
    out = torch.matmul(probs.view(B, Hkv, G * T, S), v.float()).view(B, Hq, T, v.shape[-1])
    tiny = torch.finfo(torch.float32).tiny
    out = out / total.clamp_min(tiny)[..., None]
    lse = torch.where(total > 0, m.squeeze(-1) + torch.log(total.clamp_min(tiny)), float("-inf"))
    return out, lse


def _last_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``local_attention`` of one query per row (a decode step, no mask): the last token sees every
    key, so there is no mask to build. Six ops where the causal reference takes about twenty (SmolLM2
    decode step, 4096 cached keys: 0.72 -> 0.47 ms per layer, SDPA 0.41 ms; 1 thread, load 6)."""
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    scores = torch.matmul(q.float().reshape(B, Hkv, Hq // Hkv, D), k.float().transpose(-1, -2)).mul_(scale)
    # The shift is a constant (no gradient; the softmax does not depend on it), finite unless a score
    # is NaN or infinite.
    m = torch.nan_to_num(scores.detach().amax(dim=-1, keepdim=True), nan=0.0, posinf=0.0, neginf=0.0)
    probs = torch.exp(scores - m)
    total = probs.sum(dim=-1)
    out = torch.matmul(probs, v.float()) / total[..., None]
    lse = m.squeeze(-1) + torch.log(total)
    return out.view(B, Hq, 1, v.shape[-1]), lse.view(B, Hq, 1)
