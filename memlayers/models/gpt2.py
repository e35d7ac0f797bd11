"""GPT-2 layout: learned absolute positions (``transformer.wpe``), no rotary embedding, multi-head
attention in ``transformer.h[i].attn``."""
from __future__ import annotations

from .families import Family


def _heads(config):
    head_dim = config.hidden_size // config.num_attention_heads
    return config.num_attention_heads, config.num_attention_heads, head_dim


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    layers=lambda base: base.h,
    attention_attr="attn",
    position_attr="wpe",
    rotary=False,
    heads=_heads,
    max_positions=lambda config: config.max_position_embeddings,
)
