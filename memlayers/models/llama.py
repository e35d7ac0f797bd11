"""Llama-family layout: Llama, Mistral, Qwen2, Qwen3 (rotary embedding applied inside attention,
grouped-query heads, ``model.layers[i].self_attn``, ``model.rotary_emb``)."""
from __future__ import annotations

from .families import Family


def _heads(config):
    q = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or q
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // q
    return q, kv, head_dim


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    layers=lambda base: base.layers,
    attention_attr="self_attn",
    position_attr="rotary_emb",
    rotary=True,
    heads=_heads,
    max_positions=lambda config: 0,
)
