"""PKM: fused weighted gather vs F.embedding_bag, and the whole layer vs the pip package product-key-memory.

    python bench/run.py --op pkm             # table, writes bench/results/pkm-<cpu|gpu>.json
    pytest bench/bench_pkm.py                # pytest-benchmark (timings via common.measure)

GPU shape is the issue's: tokens 32K, 1M values (1024 x 1024 product keys), D = 1024, heads 4,
topk 32 (so 128 weighted rows per token), bf16. Two levels:
- ``gather``: ``weighted_embedding_bag`` (Triton) vs ``F.embedding_bag(mode="sum", per_sample_weights)``,
  forward, backward (table and weight gradients) and forward+backward; forward GB/s counts the gathered
  rows, the indices and weights, and the output, with the fraction of the device's HBM peak;
- ``layer``: ``ProductKeyMemory`` vs ``product_key_memory.PKM`` (same heads, keys, topk, half-key size
  128), forward+backward.
On CPU the same rows run at small sizes in fp32; "ours" is then the naive path.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, device_peaks, measure, peak_memory_bytes  # noqa: E402

from memlayers.layers.pkm import ProductKeyMemory  # noqa: E402
from memlayers.ops.embedding_bag import weighted_embedding_bag  # noqa: E402

COLUMNS = ["level", "T", "values", "D", "heads", "topk", "dtype", "provider", "pass", "ms", "ms_p20", "ms_p80",
           "gbps", "bw_fraction", "peak_mb", "speedup_vs_ref", "note"]


def shape(device: torch.device, quick: bool):
    """(T, n half-keys, D, heads, topk, dtype)."""
    if device.type == "cuda":
        return (32_768, 1024, 1024, 4, 32, torch.bfloat16)
    return (512, 64, 128, 2, 8, torch.float32) if quick else (2048, 128, 256, 4, 16, torch.float32)


def gather_inputs(T, n, D, heads, topk, dtype, device):
    V, K = n * n, heads * topk
    weight = (torch.randn(V, D, device=device) * 0.02).to(dtype).requires_grad_()
    indices = torch.randint(0, V, (T, K), device=device)
    psw = torch.softmax(torch.randn(T, heads, topk, device=device), -1).reshape(T, K).to(dtype).requires_grad_()
    return weight, indices, psw


def gather_providers(device):
    ours = "triton" if device.type == "cuda" else "torch"
    return {
        "ours": lambda w, i, p: weighted_embedding_bag(w, i, p, backend=ours, check_indices=False),
        "F.embedding_bag": lambda w, i, p: F.embedding_bag(i, w, per_sample_weights=p, mode="sum"),
    }


def gather_passes(fn, weight, indices, psw):
    out = fn(weight, indices, psw)
    grad = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            return fn(weight, indices, psw)

    def bwd():
        return torch.autograd.grad(out, (weight, psw), grad, retain_graph=True)

    def fwd_bwd():
        return torch.autograd.grad(fn(weight, indices, psw), (weight, psw), grad)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def gather_rows(T, n, D, heads, topk, dtype, device):
    weight, indices, psw = gather_inputs(T, n, D, heads, topk, dtype, device)
    K, elt = heads * topk, weight.element_size()
    fwd_bytes = T * K * D * elt + T * K * (indices.element_size() + elt) + T * D * elt
    peaks = device_peaks()
    base = {"level": "gather", "T": T, "values": n * n, "D": D, "heads": heads, "topk": topk,
            "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for provider, fn in gather_providers(device).items():
        for name, run in gather_passes(fn, weight, indices, psw).items():
            t = measure(run, device)
            peak = peak_memory_bytes(run, device)
            row = {**base, "provider": provider, "pass": name, **t, "peak_mb": peak / 2**20 if peak is not None else None}
            if name == "fwd":
                row["gbps"] = fwd_bytes / (t["ms"] * 1e-3) / 1e9
                if peaks:
                    row["bw_fraction"] = row["gbps"] / peaks["gbps"]
            rows.append(row)
    ref = {r["pass"]: r["ms"] for r in rows if r["provider"] == "F.embedding_bag"}
    for r in rows:
        r["speedup_vs_ref"] = ref[r["pass"]] / r["ms"]
    return rows


def layer_providers(T, n, D, heads, topk, dtype, device):
    """name -> (module, x [1, T, D])."""
    x = torch.randn(1, T, D, device=device, dtype=dtype)
    backend = "triton" if device.type == "cuda" else "torch"
    out = {"ours": (ProductKeyMemory(D, heads=heads, num_keys=n, topk=topk, key_dim=256, backend=backend), x)}
    try:
        from product_key_memory import PKM
    except ImportError:
        PKM = None
    if PKM is not None:
        out["pip product-key-memory"] = (PKM(D, heads=heads, num_keys=n, topk=topk, dim_head=128), x)
    return {k: (m.to(device=device, dtype=dtype), inp) for k, (m, inp) in out.items()}


def layer_passes(module, x):
    def fwd():
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        module(x).float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def layer_rows(T, n, D, heads, topk, dtype, device):
    base = {"level": "layer", "T": T, "values": n * n, "D": D, "heads": heads, "topk": topk,
            "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for provider, (module, x) in layer_providers(T, n, D, heads, topk, dtype, device).items():
        for name, run in layer_passes(module, x).items():
            t = measure(run, device)
            peak = peak_memory_bytes(run, device)
            rows.append({**base, "provider": provider, "pass": name, **t, "peak_mb": peak / 2**20 if peak is not None else None})
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = {r["pass"]: r["ms"] for r in rows if r["provider"] == "pip product-key-memory"}
    for r in rows:
        if r["pass"] in ref:
            r["speedup_vs_ref"] = ref[r["pass"]] / r["ms"]
    return rows


def table(quick: bool = False):
    device = bench_device()
    s = shape(device, quick)
    rows = gather_rows(*s, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rows += layer_rows(*s, device)
    if device.type != "cuda":
        for r in rows:
            r["note"] = "cpu: ours = naive path (Triton needs CUDA for timing)"
    return rows, COLUMNS


@pytest.mark.parametrize("pass_name", ["fwd", "bwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours", "F.embedding_bag"])
def test_pkm_gather(benchmark, provider, pass_name):
    device = bench_device()
    weight, indices, psw = gather_inputs(*shape(device, quick=True), device)
    run = gather_passes(gather_providers(device)[provider], weight, indices, psw)[pass_name]
    benchmark.extra_info.update(measure(run, device))
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
