"""HuggingFace integration: prefill and decode tokens/s with kNN memory attached vs. without.

``python bench/run.py --op hf`` (``--quick``: the tiny model only).

GPU: a Llama-shaped model of about 1B parameters (hidden 2048, 16 layers, 32 query / 8 kv heads,
MLP 8192, vocab 32000; random weights, bf16) with kNN memory at 4 layers holding 64K or 256K
tokens, against the same model without memory at its native 4K context. CPU: a tiny model with
small memories (and says so in the rows).

The stores are filled directly with random keys/values (``KNNMemory.add``) instead of by
``memorize``: retrieval cost depends on how many memories there are, not on what they say.
Prefill is one forward over the prompt (timed by ``common.measure``); decode is a greedy loop of
single-token forwards over a growing KV cache, timed as a whole (CUDA-synchronized wall clock: each
step depends on the last, so it cannot be re-run in isolation).
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from common import bench_device, measure

GPU_SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000)
CPU_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256)
MEMORY_LAYERS = [3, 7, 11, 15]


def _model(shape: Dict[str, int], device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=1 << 20, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


@torch.no_grad()
def _fill_memories(model, tokens: int, block: int = 8192) -> None:
    """Give every attached store ``tokens`` random memories at positions ``0..tokens-1``."""
    from memlayers.models.state import get_state

    state = get_state(model)
    p = next(model.parameters())
    for w in state.wrappers("knn"):
        w.ensure_memory(1, p.device, p.dtype)
        mem = w.memory
        for start in range(0, tokens, block):
            n = min(block, tokens - start)
            keys = torch.randn(1, mem.heads, n, mem.dim, device=p.device, dtype=p.dtype)
            mem.add(keys, torch.randn_like(keys))
    state.positions.resize(1)
    state.positions.offset.fill_(tokens)
    state.sync_offsets()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _run(model, prompt_len: int, decode_steps: int, device: torch.device) -> Dict[str, float]:
    from transformers import DynamicCache

    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (1, prompt_len), device=device)
    prefill = measure(lambda: model(prompt, use_cache=False), device, rep_ms=500.0)

    cache = DynamicCache(config=model.config)
    token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm the decode path (allocator, kernels) before timing
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    _sync(device)
    decode_s = time.perf_counter() - t0
    return {"prefill_ms": prefill["ms"], "prefill_tok_s": prompt_len / (prefill["ms"] / 1000.0),
            "decode_ms_per_token": decode_s / decode_steps * 1000.0, "decode_tok_s": decode_steps / decode_s}


def table(quick: bool):
    import memlayers.models as mm

    device = bench_device()
    gpu = device.type == "cuda"
    if gpu and not quick:
        shape, dtype, prompt_len, decode_steps, memories = GPU_SHAPE, torch.bfloat16, 4096, 64, [65536, 262144]
        layers = MEMORY_LAYERS
    else:
        shape, dtype, prompt_len, decode_steps, memories = CPU_SHAPE, torch.float32, 128, 16, [1024, 4096]
        layers = [0, 1, 2, 3]
    model = _model(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    label = f"llama-{params / 1e9:.2f}B" if params > 1e8 else f"llama-tiny-{params / 1e3:.0f}K"
    rows: List[Dict[str, object]] = []
    base = _run(model, prompt_len, decode_steps, device)
    rows.append({"model": label, "device": device.type, "memory_tokens": 0, "memory_layers": 0,
                 "context": prompt_len, **base, "decode_vs_base": 1.0})
    for tokens in memories:
        mm.attach(model, mm.KNNMemoryConfig(layers=layers, top_k=32, capacity=tokens))
        _fill_memories(model, tokens)
        r = _run(model, prompt_len, decode_steps, device)
        rows.append({"model": label, "device": device.type, "memory_tokens": tokens, "memory_layers": len(layers),
                     "context": prompt_len, **r, "decode_vs_base": r["decode_tok_s"] / base["decode_tok_s"]})
        mm.detach(model)
        if gpu:
            torch.cuda.empty_cache()
    columns = ["model", "device", "memory_tokens", "memory_layers", "context", "prefill_tok_s", "decode_tok_s",
               "decode_ms_per_token", "decode_vs_base"]
    return rows, columns
