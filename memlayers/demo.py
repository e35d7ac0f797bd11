"""``memlayers demo``: stream a long sequence through a KNNMemory and compare search backends."""
from __future__ import annotations

import time
from typing import Dict, List

import torch

from .memory import KNNMemory

BACKENDS = [
    ("exact (torch)", dict(index="exact", backend="torch")),
    ("exact (triton)", dict(index="exact", backend="triton")),
    ("faiss flat", dict(index="flat")),
    ("faiss ivf", dict(index="ivf", index_options=dict(nlist=128, nprobe=16))),
    ("faiss hnsw", dict(index="hnsw", index_options=dict(hnsw_m=16, ef_search=64))),
]


def _available(opts: dict, device: torch.device) -> str:
    """Why a backend cannot run here ('' when it can)."""
    if opts.get("backend") == "triton" and device.type != "cuda":
        return "needs a CUDA GPU (the interpreter is for tests)"
    if opts["index"] != "exact":
        try:
            import faiss  # noqa: F401
        except ImportError:
            return "faiss not installed (pip install memlayers[faiss])"
    return ""


def run_store_demo(tokens: int = 40_000, capacity: int = 16_384, heads: int = 4, dim: int = 64,
                   queries: int = 64, k: int = 32, chunk: int = 2_000, seed: int = 0) -> List[Dict[str, object]]:
    """Stream ``tokens`` random (key, value) pairs through each backend's memory, then search it.

    Keys are drawn around a few hundred centers (as real attention keys cluster), so approximate
    indexes have structure to exploit. Returns one row per backend: items stored, build time, search
    time per query, recall@k against exact search.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(256, dim, generator=gen)
    pick = torch.randint(0, 256, (1, heads, tokens), generator=gen)
    keys = (centers[pick] + 0.5 * torch.randn(1, heads, tokens, dim, generator=gen)).to(device)
    values = torch.randn(1, heads, tokens, dim, generator=gen).to(device)
    q = (centers[torch.randint(0, 256, (1, heads, queries), generator=gen)]
         + 0.5 * torch.randn(1, heads, queries, dim, generator=gen)).to(device)

    rows: List[Dict[str, object]] = []
    exact_idx = None
    for name, opts in BACKENDS:
        why = _available(opts, device)
        if why:
            rows.append({"backend": name, "note": why})
            continue
        mem = KNNMemory(1, heads, dim, capacity=capacity, device=device, **opts)
        t0 = time.perf_counter()
        for start in range(0, tokens, chunk):
            mem.add(keys[:, :, start : start + chunk], values[:, :, start : start + chunk])
        mem.search(q[:, :, :1], k)  # builds lazily rebuilt indexes; not part of the search time
        build_s = time.perf_counter() - t0
        reps = 3
        t0 = time.perf_counter()
        for _ in range(reps):
            res = mem.search(q, k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_query_us = (time.perf_counter() - t0) / (reps * heads * queries) * 1e6
        if exact_idx is None:
            exact_idx = res.indices
        recall = (res.indices[..., None] == exact_idx[..., None, :]).any(-1).float().mean().item()
        rows.append({"backend": name, "stored": int(mem.count.sum()) * heads, "build_s": build_s,
                     "search_us_per_query": per_query_us, f"recall@{k}": recall,
                     "memory_MiB": mem.nbytes() / 2**20, "note": ""})
    return rows


def format_rows(rows: List[Dict[str, object]]) -> str:
    columns = ["backend", "stored", "build_s", "search_us_per_query"]
    columns += [c for c in rows[0] if c.startswith("recall")] if rows and "stored" in rows[0] else []
    columns += ["memory_MiB", "note"]

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if v < 100 else f"{v:.0f}"
        return "-" if v is None else str(v)

    table = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


PARTS = ("real", "tiny", "store")
DEFAULT_PARTS = ("real", "tiny")


def main(parts=DEFAULT_PARTS, model: str = "smollm2", doc_tokens: int = 2048, window: int = 256,
         depths=None, new_tokens: int = 8) -> int:
    """Run the demo's ``parts`` in order: "real" (the pretrained model with kNN memory against its
    window alone), "tiny" (the exactness check on a tiny Llama), "store" (search backends compared).
    Returns 0, or 1 when the tiny part's equivalence check fails."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {list(parts)}")
    code = 0
    for n, part in enumerate(parts, 1):
        if n > 1:
            print()
        header = f"memlayers demo {n}/{len(parts)}: "
        if part == "store":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            print(header + f"KNNMemory, 40,000 tokens streamed through 16,384 slots x 4 heads, "
                  f"D=64, k=32, 64 queries per head ({device})")
            print(format_rows(run_store_demo()))
            continue
        try:
            from .hf import demo as hf_demo
            from .hf.pretrained import model_source
        except ImportError as e:  # transformers missing: pip install memlayers[hf]
            print(header + f"skipped: {e}")
            continue
        if part == "real":
            print(header + "a pretrained model reads a long document with kNN memory and without it")
            try:
                model_source(model)  # the embedded model's package, or the file, exists: checked before loading
            except (ModuleNotFoundError, FileNotFoundError) as e:
                print(f"skipped: {e}")
                continue
            hf_demo.run_real_demo(model, doc_tokens=doc_tokens, window=window,
                                  depths=hf_demo.DEPTHS if depths is None else depths, new_tokens=new_tokens)
        else:
            print(header + "a tiny random-weight Llama whose memory retrieves everything equals its full context")
            if not hf_demo.run_equivalence_demo()["equivalent"]:
                code = 1
    return code
