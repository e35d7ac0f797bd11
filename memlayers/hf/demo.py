"""``memlayers demo``'s HuggingFace part: a tiny Llama gets a kNN memory, memorizes a long input,
and answers a continuation with it, compared against the full-context model.

Runs on CPU in seconds (random weights: the point is the mechanics and the exactness check).
"""
from __future__ import annotations

import time


def run_demo(memorized_tokens: int = 512, continuation: int = 32, new_tokens: int = 16, chunk_size: int = 64) -> dict:
    """Build, attach, memorize, generate, check; print a summary and return its numbers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..ops.memory_attention import memory_attention
    from ..ops.utils.testing import rel_err
    from .attach import attach
    from .config import KNNMemoryConfig
    from .memorize import memorize
    from .state import memory_wrappers, positions_of

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    text = torch.randint(1, config.vocab_size, (1, memorized_tokens + continuation))
    memory_part, prompt = text[:, :memorized_tokens], text[:, memorized_tokens:]
    greedy = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)

    # The reference: the whole text in the model's own context.
    with torch.no_grad():
        full_logits = model(text).logits[:, memorized_tokens:]
    t0 = time.perf_counter()
    full_generation = model.generate(text, **greedy)[:, text.shape[1]:]
    full_s = time.perf_counter() - t0

    # Every layer retrieves every memory (top_k >= memorized tokens): exactly the full context.
    attach(model, KNNMemoryConfig(layers=None, top_k=memorized_tokens, capacity=memorized_tokens, backend="torch"))
    t0 = time.perf_counter()
    memorize(model, memory_part, chunk_size=chunk_size)
    memorize_s = time.perf_counter() - t0
    with torch.no_grad():
        mem_logits = model(prompt).logits
    t0 = time.perf_counter()
    generation = model.generate(prompt, **greedy)[:, prompt.shape[1]:]
    generate_s = time.perf_counter() - t0

    positions = positions_of(model)
    layers = memory_wrappers(model, ("knn",))
    memory_bytes = sum(w.nbytes() for w in layers)

    # Retrieval cost per token and layer: search the store, attend to the retrieved memories.
    mem = layers[-1].memory
    q = torch.randn(1, config.num_attention_heads, 64, config.head_dim)
    cos, sin = positions.rope.get(memorized_tokens, q.device)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        hits = mem.search(q, memorized_tokens, gather=False)
        memory_attention(q, mem.keys, mem.values, hits.indices, mem_positions=mem.positions,
                         rotary_cos=cos, rotary_sin=sin, backend="torch")
    retrieval_us = (time.perf_counter() - t0) / (reps * q.shape[2]) * 1e6

    err = rel_err(mem_logits, full_logits)
    same = bool(torch.equal(generation, full_generation))
    summary = {
        "model": f"tiny Llama from LlamaConfig ({n_params / 1e3:.0f}K params, 4 layers, GQA 4q/2kv heads)",
        "tokens memorized": int(positions.offset[0]),
        "memory layers": len(layers),
        "memory size (bytes)": memory_bytes,
        "memorize time (s)": round(memorize_s, 3),
        "retrieval time per token per layer (us)": round(retrieval_us, 1),
        "generate with memory (s)": round(generate_s, 3),
        "generate with full context (s)": round(full_s, 3),
        "logits rel. error vs full context": float(f"{err:.2e}"),
        "greedy generation equals full context": same,
        "generated tokens": generation[0].tolist(),
    }
    print("memlayers HuggingFace demo: kNN memory (Extended Mind Transformers) attached with ml.attach")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value}")
    print("  equivalence check: " + ("PASS" if err < 1e-4 and same else "FAIL"))
    return summary


if __name__ == "__main__":
    run_demo()
