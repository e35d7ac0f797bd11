"""Benchmarks of kNN-memory attention: ``python bench/run.py --op memory_attention [--quick]``.

Rows:
- ``op``: the retrieval attention alone (given the top-k slot ids), fused Triton kernel vs the torch
  gather path (``memory_attention_naive``: gathers ``[B, H, T, k, D]`` then softmax), forward and
  forward+backward (gradient to q); GB/s counts the gathered key and value rows once.
- ``search``: the exact top-k search of the memory (part of every layer call).
- ``local``: the causal local pass with its log-sum-exp (what ``combine="joint"`` merges with the
  memories): ``local flash (triton)`` (the fused kernel) vs ``torch chunked`` (explicit scores, the
  naive path) vs ``sdpa`` (PyTorch's fused attention, which gives no log-sum-exp: the speed to match);
  TFLOP/s counts the causal half of the score matrix (fwd 4 T^2/2 H hd, fwd+bwd 3.5x that).
- ``layer``: ``KNNMemoryAttention`` (memory full, joint and gate combines) vs the same projections with
  SDPA over the local window alone (``sdpa-local``: the cost of attention without memory).

GPU: segment 2048, memory 64K and 256K, k = 32, heads 16, head_dim 64/128, bf16. Without a GPU the
same rows run on CPU at small sizes, torch providers only (the Triton kernel would run in the
interpreter), and the device column says so.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_device, device_peaks, measure, peak_memory_bytes  # noqa: E402

from memlayers.layers.knn_attention import KNNMemoryAttention  # noqa: E402
from memlayers.layers.rotary import apply_rotary  # noqa: E402
from memlayers.ops.local_attention import local_attention  # noqa: E402
from memlayers.ops.memory_attention import memory_attention  # noqa: E402

COLUMNS = ["device", "part", "provider", "pass", "T", "C", "k", "H", "hd", "dtype", "ms", "ms_p20", "ms_p80",
           "gbps", "frac_peak_bw", "tflops", "frac_peak_flops", "peak_mb"]


def shapes(device: torch.device, quick: bool):
    """(T, C, k, H, hd) per row group, and the dtype."""
    if device.type == "cuda":
        mems = (65536,) if quick else (65536, 262144)
        hds = (64,) if quick else (64, 128)
        return [(2048, c, 32, 16, hd) for c in mems for hd in hds], torch.bfloat16
    return ([(128, 2048, 32, 16, 64)] if quick else [(256, 4096, 32, 16, 64), (256, 16384, 32, 16, 64)]), torch.float32


def make_layer(T, C, k, H, hd, dtype, device, **kw):
    torch.manual_seed(0)
    layer = KNNMemoryAttention(H * hd, H, H, hd, top_k=k, capacity=C, **kw).to(device=device, dtype=dtype)
    layer.prefill_memory(torch.randn(1, H, C, hd, device=device, dtype=dtype),
                         torch.randn(1, H, C, hd, device=device, dtype=dtype))
    return layer


def sdpa_local(layer: KNNMemoryAttention, x: torch.Tensor) -> torch.Tensor:
    """The same projections and rotary embedding, SDPA over the segment alone (no memory)."""
    B, T, _ = x.shape
    q = layer._heads(layer.q_proj, x, layer.heads)
    k = layer._heads(layer.k_proj, x, layer.kv_heads)
    v = layer._heads(layer.v_proj, x, layer.kv_heads)
    cos, sin = layer.rope.at(torch.arange(T, device=x.device)[None])
    out = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, is_causal=True)
    return layer.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def _row(device, part, provider, pss, shape, dtype, fn, nbytes=None, flops=None):
    T, C, k, H, hd = shape
    t = measure(fn, device)
    peaks = device_peaks()
    gbps = nbytes / t["ms"] / 1e6 if nbytes else None
    tflops = flops / t["ms"] / 1e9 if flops else None
    return {"device": "gpu" if device.type == "cuda" else "cpu (small sizes)", "part": part, "provider": provider,
            "pass": pss, "T": T, "C": C, "k": k, "H": H, "hd": hd, "dtype": str(dtype).replace("torch.", ""),
            **t, "gbps": gbps, "frac_peak_bw": gbps / peaks["gbps"] if gbps and peaks else None,
            "tflops": tflops, "frac_peak_flops": tflops / peaks["tflops_bf16"] if tflops and peaks else None,
            "peak_mb": (lambda b: b / 2**20 if b is not None else None)(peak_memory_bytes(fn, device))}


def op_rows(device, shape, dtype):
    T, C, k, H, hd = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, H, T, hd, generator=g).to(device, dtype).requires_grad_()
    keys = torch.randn(1, H, C, hd, generator=g).to(device, dtype)
    values = torch.randn(1, H, C, hd, generator=g).to(device, dtype)
    idx = torch.randint(0, C, (1, H, T, k), generator=g).to(device)
    nbytes = H * T * k * 2 * hd * keys.element_size()
    providers = (["triton"] if device.type == "cuda" else []) + ["torch"]
    rows = []
    for backend in providers:
        name = "fused" if backend == "triton" else "torch-gather"

        def fwd():
            with torch.no_grad():
                return memory_attention(q, keys, values, idx, backend=backend)

        def fwd_bwd():
            out, lse = memory_attention(q, keys, values, idx, backend=backend)
            out.float().sum().backward()
            q.grad = None

        rows.append(_row(device, "op", name, "fwd", shape, dtype, fwd, nbytes))
        rows.append(_row(device, "op", name, "fwd+bwd", shape, dtype, fwd_bwd, 2 * nbytes))
    return rows


def local_rows(device, shape, dtype):
    """The causal local pass over the segment (no prefix): ours with its lse vs torch chunked vs SDPA."""
    T, C, k, H, hd = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, keys, values = (torch.randn(1, H, T, hd, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    fwd_flops = 4 * H * hd * T * T / 2  # two matmuls over the causal half
    providers = {
        "sdpa": lambda: (F.scaled_dot_product_attention(q, keys, values, is_causal=True), None),
        "torch chunked": lambda: local_attention(q, keys, values, backend="torch"),
    }
    if device.type == "cuda":
        providers["local flash (triton)"] = lambda: local_attention(q, keys, values, backend="triton")
    rows = []
    for name, call in providers.items():
        def fwd(call=call):
            with torch.no_grad():
                return call()

        def fwd_bwd(call=call):
            out, lse = call()
            loss = out.float().sum() if lse is None else out.float().sum() + lse.sum()
            loss.backward()
            q.grad = keys.grad = values.grad = None

        rows.append(_row(device, "local", name, "fwd", shape, dtype, fwd, flops=fwd_flops))
        rows.append(_row(device, "local", name, "fwd+bwd", shape, dtype, fwd_bwd, flops=3.5 * fwd_flops))
    return rows


def layer_rows(device, shape, dtype):
    T, C, k, H, hd = shape
    x = torch.randn(1, T, H * hd, device=device, dtype=dtype, requires_grad=True)
    rows = []
    variants = [("layer-joint", dict(combine="joint")), ("layer-gate", dict(combine="gate"))]
    if device.type == "cuda":
        variants.append(("layer-gate-torch-gather", dict(combine="gate", backend="torch")))
    for name, kw in variants:
        layer = make_layer(T, C, k, H, hd, dtype, device, **kw)
        # Read only: a timed call must not grow the memory or move positions.
        rows += _layer_pair(device, name, shape, dtype, lambda layer=layer: layer(x, update_memory=False), layer, x)
    base = layer  # same projections, memory unused
    rows += _layer_pair(device, "sdpa-local", shape, dtype, lambda: sdpa_local(base, x), base, x)

    mem = base.memory
    qs = torch.randn(1, H, T, hd, device=device, dtype=dtype)
    rows.append(_row(device, "search", "knn_search-exact", "fwd", shape, dtype, lambda: mem.search(qs, k, gather=False)))
    return rows


def _layer_pair(device, name, shape, dtype, call, layer, x):
    def fwd():
        with torch.no_grad():
            return call()

    def fwd_bwd():
        call().float().sum().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return [_row(device, "layer", name, "fwd", shape, dtype, fwd), _row(device, "layer", name, "fwd+bwd", shape, dtype, fwd_bwd)]


def table(quick: bool):
    device = bench_device()
    sizes, dtype = shapes(device, quick)
    rows = []
    for shape in sizes:
        rows += op_rows(device, shape, dtype)
        rows += local_rows(device, shape, dtype)
        rows += layer_rows(device, shape, dtype)
    return rows, COLUMNS


# ----------------------------------------------------------------------------- pytest-benchmark

def _bench_inputs():
    device = bench_device()
    (shape, *_), dtype = shapes(device, quick=True)
    T, C, k, H, hd = shape
    q = torch.randn(1, H, T, hd, device=device, dtype=dtype)
    keys = torch.randn(1, H, C, hd, device=device, dtype=dtype)
    idx = torch.randint(0, C, (1, H, T, k), device=device)
    return device, shape, dtype, q, keys, idx


def test_memory_attention_op_fwd(benchmark):
    device, shape, dtype, q, keys, idx = _bench_inputs()
    out = benchmark(lambda: memory_attention(q, keys, keys, idx))
    benchmark.extra_info.update(_row(device, "op", "auto", "fwd", shape, dtype,
                                     lambda: memory_attention(q, keys, keys, idx)))
    assert out[0].shape == (1, shape[3], shape[0], shape[4])


def test_knn_attention_layer_fwd(benchmark):
    device = bench_device()
    (shape, *_), dtype = shapes(device, quick=True)
    T, C, k, H, hd = shape
    layer = make_layer(T, C, k, H, hd, dtype, device)
    x = torch.randn(1, T, H * hd, device=device, dtype=dtype)
    with torch.no_grad():
        y = benchmark(lambda: layer(x, update_memory=False))
        benchmark.extra_info.update(_row(device, "layer", "layer-joint", "fwd", shape, dtype,
                                         lambda: layer(x, update_memory=False)))
    assert y.shape == x.shape
