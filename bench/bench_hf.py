"""HuggingFace integration: what memory costs on a model, side by side with the same model without it.

``python bench/run.py --op hf`` (``--quick``: short inputs). For each configuration (the library's
default ``KNNMemoryConfig`` (top_k 64), the same with ``top_k=32`` (the default before 72fcad4), and
the default on 8 evenly spaced layers of the model's decoder) the rows are:

- ``memorize``: ``ml.memorize`` over N tokens in 512-token chunks, against a plain forward of the
  decoder over the very same chunks (no cache, no memory): ``vs_plain`` is memorize throughput /
  plain throughput (issue 12's target: >= 0.5).
- ``decode``: greedy single-token steps after a ``CONTEXT``-token prompt (the local context), with
  those N tokens memorized against the same model without memory: ``vs_plain`` is ms/token with
  memory / without (target: <= 1.5 at N = 16K). The two models decode in alternation, one step
  each, and each side's median step is kept: a shared machine's load changes both alike.
  ``decode_vs_base`` is its inverse (tokens/s with memory over without), the figure ``make
  gpu-check`` reports.
- ``memory_bytes``: what the kNN stores hold (``KNNAttention.nbytes``), at the config's capacity.

CPU: the embedded SmolLM2-135M-Instruct (``load_pretrained("smollm2")``, fp32), N = 16384, a
4096-token context. GPU: the same model in bf16, N = 65536. Only public APIs: the memories are
filled by ``memorize`` itself. The load average of the machine is recorded with the rows.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Dict, List, Optional

import torch

from common import bench_device

CHUNK = 512
SPREAD_LAYERS = 8  # the second layer set: this many decoder layers, evenly spaced


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


class _Decoder:
    """Greedy decoding of one model, a step at a time, after a prompt read into its KV cache."""

    def __init__(self, model, prompt: torch.Tensor):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache(config=model.config)
        with torch.no_grad():
            for start in range(0, prompt.shape[1], CHUNK):  # the prompt in chunks: bounded score blocks
                logits = model(prompt[:, start:start + CHUNK], past_key_values=self.cache, use_cache=True).logits
        self.token = logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def step(self) -> None:
        self.token = self.model(self.token, past_key_values=self.cache, use_cache=True).logits[:, -1:].argmax(-1)


def _decode_pair(plain, memory, prompt: torch.Tensor, steps: int, device: torch.device):
    """Median ms per step of ``plain`` and ``memory`` decoding the same prompt, in alternation."""
    sides = [_Decoder(plain, prompt), _Decoder(memory, prompt)]
    times: List[List[float]] = [[], []]
    for i in range(steps + 2):
        for side, record in zip(sides, times):
            s = _clock(side.step, device)
            if i >= 2:  # two warm steps
                record.append(s * 1000.0)
    return statistics.median(times[0]), statistics.median(times[1])


def _spread(n_layers: int, count: int) -> List[int]:
    return sorted({round(i * n_layers / count) for i in range(count)})


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def table(quick: bool):
    import memlayers as ml
    from memlayers.hf.pretrained import load_pretrained
    from memlayers.hf.state import memory_wrappers

    device = bench_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokens = 1024 if quick else (65536 if device.type == "cuda" else 16384)
    context = 512 if quick else 4096
    steps = 8 if quick else 16
    plain, _ = load_pretrained("smollm2", dtype=dtype, device=device)
    model, _ = load_pretrained("smollm2", dtype=dtype, device=device)  # a copy: memory goes on this one
    n_layers = model.config.num_hidden_layers
    default = ml.KNNMemoryConfig()
    spread = f"{SPREAD_LAYERS} of {n_layers}"
    configs = [(default.layers, default), (default.layers, ml.KNNMemoryConfig(top_k=32)),
               (spread, ml.KNNMemoryConfig(layers=_spread(n_layers, SPREAD_LAYERS)))]
    label = f"SmolLM2-135M {str(dtype).replace('torch.', '')}"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=g).to(device)
    prompt = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(device)

    _plain_chunks(plain, ids[:, :CHUNK])  # warm
    rows: List[Dict[str, object]] = []
    for layers, config in configs:
        # The baseline right before each memorize: a shared machine's load drifts between configurations.
        plain_s = _clock(lambda: _plain_chunks(plain, ids), device)
        common = {"model": label, "device": device.type, "threads": torch.get_num_threads(), "chunk": CHUNK,
                  "top_k": config.top_k, "capacity": config.capacity, "position": config.position,
                  "layers": "all" if layers is None else str(layers),
                  "tokens": tokens, "memory_tokens": tokens}
        ml.attach(model, config)
        load = _load_average()
        memorize_s = _clock(lambda: ml.memorize(model, ids, chunk_size=CHUNK, progress=False), device)
        memory_bytes = sum(w.nbytes() for w in memory_wrappers(model, ("knn",)))
        base_ms, memory_ms = _decode_pair(plain, model, prompt, steps, device)
        ml.detach(model)
        rows.append({**common, "row": "memorize", "load_avg": load,
                     "plain_tok_s": tokens / plain_s, "memory_tok_s": tokens / memorize_s,
                     "plain_s": plain_s, "memory_s": memorize_s, "vs_plain": plain_s / memorize_s,
                     "target": ">= 0.5", "met": plain_s / memorize_s >= 0.5, "memory_bytes": memory_bytes})
        rows.append({**common, "row": "decode", "load_avg": _load_average(), "context": context,
                     "plain_ms_per_token": base_ms, "memory_ms_per_token": memory_ms,
                     "vs_plain": memory_ms / base_ms, "decode_vs_base": base_ms / memory_ms,
                     "target": "<= 1.5", "met": memory_ms / base_ms <= 1.5, "memory_bytes": memory_bytes})
    columns = ["model", "device", "row", "layers", "tokens", "top_k", "plain_tok_s", "memory_tok_s",
               "plain_ms_per_token", "memory_ms_per_token", "memory_bytes", "vs_plain", "target", "met", "load_avg"]
    return rows, columns
