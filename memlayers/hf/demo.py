"""``memlayers demo``'s HuggingFace parts.

``run_real_demo``: the embedded pretrained model (SmolLM2-135M-Instruct) reads a long document
through a short local window, with kNN memory and without it, side by side: passkeys hidden at
several depths outside the window, and what the memory costs (memorize throughput against a plain
forward over the same chunks, decode time per token, memory bytes), all measured in the run.

``run_equivalence_demo``: a tiny random-weight Llama whose memory retrieves everything (top_k >=
memorized tokens) must reproduce the full-context model exactly: the mechanics, checked in seconds.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

DEPTHS = (0.1, 0.4, 0.7)


class _StepClock:
    """A logits processor that only records when each generated token is chosen: the gaps between
    calls are the decode steps (the first call follows the prefill, which is not a decode step)."""

    def __init__(self):
        self.stamps: List[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def step_ms(self) -> List[float]:
        return [(b - a) * 1e3 for a, b in zip(self.stamps, self.stamps[1:])]


def _greedy(model, ids: List[int], new_tokens: int, pad_id: int):
    """Greedy answer to ``ids`` and the decode steps' times (ms), exactly ``new_tokens`` tokens."""
    import torch
    from transformers import LogitsProcessorList

    clock = _StepClock()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id, logits_processor=LogitsProcessorList([clock]))
    return out[0, x.shape[1]:].tolist(), clock.step_ms()


def _needle_position(tokenizer, context: str, needle: str) -> int:
    """Token index where ``needle`` starts in ``context`` as the model reads it (BOS included)."""
    return len(tokenizer.encode(context[: context.index(needle)], add_special_tokens=True))


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def run_real_demo(model_name: str = "smollm2", doc_tokens: int = 2048, window: int = 256,
                  depths: Sequence[float] = DEPTHS, new_tokens: int = 8, seed: int = 0) -> Dict[str, object]:
    """Passkeys at ``depths`` of a ``doc_tokens`` document, answered from the last ``window`` tokens
    plus the question: by the model alone (window only) and with kNN memory of everything before
    the window (``ml.attach(model, ml.KNNMemoryConfig(capacity=doc_tokens))``, the library's
    defaults with a store the size of the document; memorized in ``window``-token chunks). Prints the table and the measured costs; returns them.

    Raises ModuleNotFoundError (with the install line) when the embedded model is missing, and
    ValueError for a document shorter than twice the window.
    """
    import torch

    from ..probes.generators import passkey_sample
    from .attach import attach
    from .config import KNNMemoryConfig
    from .memorize import memorize, reset_memory
    from .pretrained import load_pretrained
    from .state import memory_wrappers

    if doc_tokens < 2 * window:
        raise ValueError(f"doc_tokens must be at least twice the window ({2 * window}), got {doc_tokens}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {list(depths)}")
    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    model, tok = load_pretrained(model_name)
    load_s = time.perf_counter() - t0
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    question = tok.encode(passkey_sample(tok, doc_tokens, depths[0], seed=seed).query, add_special_tokens=False)

    cases = []
    for i, depth in enumerate(depths):
        sample = passkey_sample(tok, doc_tokens, depth, seed=seed, index=i)
        ids = tok.encode(sample.context, add_special_tokens=True)
        cases.append({"depth": depth, "key": sample.expected[0], "tokens": len(ids),
                      "needle_at": _needle_position(tok, sample.context, sample.needles[0]),
                      "memorized": ids[:-window], "prompt": ids[-window:] + question})

    # Window only, and (the cost figure's baseline) the plain forward over the chunks memorize will
    # see of the first document (no memory attached yet).
    print(f"  {model_name} loaded in {load_s:.0f} s; answering {len(cases)} needles with the window alone, "
          f"then with kNN memory ...", flush=True)
    window_steps = []
    with torch.no_grad():
        for case in cases:
            answer, steps = _greedy(model, case["prompt"], new_tokens, pad_id)
            case["window_answer"] = tok.decode(answer, skip_special_tokens=True).strip()
            window_steps += steps
        memorized = torch.tensor([cases[0]["memorized"]])
        t0 = time.perf_counter()
        for start in range(0, memorized.shape[1], window):
            model(memorized[:, start : start + window])
        plain_s, plain_tokens = time.perf_counter() - t0, memorized.shape[1]

    # The defaults but the capacity: the store holds one document (the default, 65,536 slots, is
    # allocated and scanned whole whatever the document's length).
    config = KNNMemoryConfig(capacity=doc_tokens)
    attach(model, config)
    memorize_s, memory_steps, memory_bytes = [], [], 0
    for case in cases:
        reset_memory(model)
        t0 = time.perf_counter()
        memorize(model, torch.tensor([case["memorized"]]), chunk_size=window, progress=False)
        memorize_s.append(time.perf_counter() - t0)
        memory_bytes = max(memory_bytes, sum(w.nbytes() for w in memory_wrappers(model, ("knn",))))
        with torch.no_grad():
            answer, steps = _greedy(model, case["prompt"], new_tokens, pad_id)
        case["memory_answer"] = tok.decode(answer, skip_special_tokens=True).strip()
        memory_steps += steps

    rows = []
    for case in cases:
        in_window = case["needle_at"] >= case["tokens"] - window
        rows.append({"depth": case["depth"], "needle at token": case["needle_at"], "in window": in_window,
                     "pass key": case["key"],
                     "window only": case["window_answer"], "window only ok": case["key"] in case["window_answer"],
                     "kNN memory": case["memory_answer"], "kNN memory ok": case["key"] in case["memory_answer"]})
    summary = {
        "model": f"{model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, "
                 f"{model.config.num_hidden_layers} layers), fp32 CPU, {threads} threads",
        "load (s)": round(load_s, 1),
        "document tokens": doc_tokens,
        "window": window,
        "memory config": {k: v for k, v in config.to_dict().items() if k in ("layers", "top_k", "position", "combine", "capacity")},
        "recalled with kNN memory": sum(r["kNN memory ok"] for r in rows),
        "recalled window only": sum(r["window only ok"] for r in rows),
        "needles": len(rows),
        "memorize tokens/s": round(plain_tokens / memorize_s[0], 1),
        "plain forward tokens/s": round(plain_tokens / plain_s, 1),
        "memorize / plain forward": round(plain_s / memorize_s[0], 3),
        "decode ms/token, kNN memory": round(_median(memory_steps), 1),
        "decode ms/token, window only": round(_median(window_steps), 1),
        "memory bytes": memory_bytes,
        "rows": rows,
    }
    _print_real(summary)
    return summary


def _print_real(summary: Dict[str, object]) -> None:
    print(f"memlayers demo: {summary['model']}")
    print(f"  a {summary['document tokens']}-token document read through a {summary['window']}-token window; "
          f"kNN memory {summary['memory config']}")
    columns = ["depth", "needle at token", "in window", "pass key", "window only", "kNN memory"]
    table = []
    for r in summary["rows"]:
        table.append([f"{r['depth']:.2f}", str(r["needle at token"]), "yes" if r["in window"] else "no", r["pass key"],
                      ("OK   " if r["window only ok"] else "miss ") + repr(r["window only"]),
                      ("OK   " if r["kNN memory ok"] else "miss ") + repr(r["kNN memory"])])
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  " + "  ".join("-" * w for w in widths))
    for t in table:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(t, widths)))
    n = summary["needles"]
    print(f"  recalled: kNN memory {summary['recalled with kNN memory']}/{n}, window only {summary['recalled window only']}/{n}")
    print(f"  cost: memorize {summary['memorize tokens/s']} tokens/s vs plain forward over the same chunks of the first document "
          f"{summary['plain forward tokens/s']} tokens/s (ratio {summary['memorize / plain forward']}); "
          f"decode {summary['decode ms/token, kNN memory']} ms/token with memory vs "
          f"{summary['decode ms/token, window only']} ms/token window only (median); "
          f"memory {summary['memory bytes'] / 2**20:.1f} MiB; model load {summary['load (s)']} s")


def run_equivalence_demo(memorized_tokens: int = 512, continuation: int = 32, new_tokens: int = 16, chunk_size: int = 64) -> dict:
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
    summary["equivalent"] = err < 1e-4 and same
    print("  equivalence check: " + ("PASS" if summary["equivalent"] else "FAIL"))
    return summary


if __name__ == "__main__":
    run_real_demo()
