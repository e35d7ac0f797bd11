"""Tiny HuggingFace causal LMs built from configs (random weights, fp32, CPU) for the integration tests."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128
# initializer_range 0.2 (not the default 0.02) so that random models have peaked, non-degenerate
# next-token distributions: greedy generations then differ when anything is wrong.
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def tiny_model(family: str, **overrides):
    """A tiny causal LM of ``family`` in eval mode (sdpa attention unless overridden)."""
    kw = dict(COMMON, **overrides)
    attn = kw.pop("attn_implementation", "sdpa")
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        kw["n_positions"] = kw.pop("max_position_embeddings")
        kw["n_embd"], kw["n_layer"], kw["n_head"] = kw.pop("hidden_size"), kw.pop("num_hidden_layers"), kw.pop("num_attention_heads")
        cfg, cls = GPT2Config(**kw), GPT2LMHeadModel
    else:
        names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}[family]
        cfg_cls = getattr(transformers, f"{names}Config")
        cls = getattr(transformers, f"{names}ForCausalLM")
        kw.setdefault("intermediate_size", 128)
        kw.setdefault("num_key_value_heads", 2)  # grouped-query attention
        if family == "qwen3":
            kw.setdefault("head_dim", 16)
        cfg = cfg_cls(**kw)
    cfg._attn_implementation = attn
    return cls(cfg).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
