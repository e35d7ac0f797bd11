"""HuggingFace integration: what memory costs on a model, side by side with the same model without it.

``python bench/run.py --op hf`` (``--quick``: short inputs). Rows:

- ``memorize``: ``ml.memorize`` over N tokens in 512-token chunks with the library's default
  ``KNNMemoryConfig``, against a plain forward of the decoder over the very same chunks (no cache,
  no memory): ``vs_plain`` is memorize throughput / plain throughput (issue 12's target: >= 0.5).
- ``decode``: greedy single-token steps after a 512-token prompt, with those N tokens memorized
  against none: ``vs_plain`` is ms/token with memory / without (target: <= 1.5 at N = 16K).

CPU: the embedded SmolLM2-135M-Instruct (``load_pretrained("smollm2")``, fp32), N = 16384. GPU: the
same model in bf16, N = 65536. Only public APIs: the memories are filled by ``memorize`` itself.
"""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from common import bench_device

CHUNK = 512
PROMPT = 512


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def _plain_chunks(model, ids: torch.Tensor) -> None:
    for start in range(0, ids.shape[1], CHUNK):
        model.model(input_ids=ids[:, start:start + CHUNK], use_cache=False)


@torch.no_grad()
def _decode_ms(model, prompt: torch.Tensor, steps: int, device: torch.device) -> float:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm the decode path before timing
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def loop():
        nonlocal token
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    return _clock(loop, device) / steps * 1000.0


def table(quick: bool):
    import memlayers as ml
    from memlayers.hf.pretrained import load_pretrained

    device = bench_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 1024 if quick else (65536 if device.type == "cuda" else 16384)
    steps = 8 if quick else 32
    model, _ = load_pretrained("smollm2", dtype=dtype, device=device, cache=False)
    config = ml.KNNMemoryConfig()
    label = f"SmolLM2-135M {str(dtype).replace('torch.', '')}"
    common = {"model": label, "device": device.type, "chunk": CHUNK, "top_k": config.top_k,
              "layers": "all" if config.layers is None else str(config.layers), "position": config.position}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(device)
    prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT), generator=g).to(device)
    rows: List[Dict[str, object]] = []

    _plain_chunks(model, ids[:, :CHUNK])  # warm
    plain_s = _clock(lambda: _plain_chunks(model, ids), device)
    base_ms = _decode_ms(model, prompt, steps, device)

    ml.attach(model, config)
    memorize_s = _clock(lambda: ml.memorize(model, ids, chunk_size=CHUNK, progress=False), device)
    memory_ms = _decode_ms(model, prompt, steps, device)
    ml.detach(model)

    rows.append({**common, "row": "memorize", "tokens": tokens,
                 "plain_tok_s": tokens / plain_s, "memory_tok_s": tokens / memorize_s,
                 "plain_s": plain_s, "memory_s": memorize_s, "vs_plain": plain_s / memorize_s, "target": ">= 0.5"})
    rows.append({**common, "row": "decode", "tokens": tokens, "plain_ms_per_token": base_ms,
                 "memory_ms_per_token": memory_ms, "vs_plain": memory_ms / base_ms, "target": "<= 1.5"})
    columns = ["model", "device", "row", "tokens", "layers", "top_k", "plain_tok_s", "memory_tok_s",
               "plain_ms_per_token", "memory_ms_per_token", "vs_plain", "target"]
    return rows, columns
