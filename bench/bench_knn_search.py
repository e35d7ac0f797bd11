"""knn_search: ours vs torch matmul+topk vs faiss, plus the bare q @ k^T matmul as the floor.

    python bench/run.py --op knn_search            # table, writes bench/results/knn_search-<cpu|gpu>.json
    pytest bench/bench_knn_search.py               # pytest-benchmark (timings via common.measure)

GPU shapes follow the issue: M in 16K..1M keys, D 64/128, k 32/256, T 1 (decode) and 4096 (prefill),
bf16. On CPU the same grid runs in fp32 (prefill up to M = 256K: at 1M one call takes tens of
seconds), "ours" is the naive path, and it runs twice: on keys laid out as ``KNNMemory`` stores them on
CPU (dim-major; the "memlayers" rows) and on plain contiguous keys ("memlayers slot-major keys").
``vs_faiss`` is faiss flat's time over the row's time (above 1: faster than faiss).
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, device_peaks, measure  # noqa: E402

from memlayers import knn_search  # noqa: E402

COLUMNS = ["T", "M", "D", "k", "dtype", "provider", "ms", "ms_p20", "ms_p80", "tflops", "vs_torch", "vs_faiss",
           "vs_matmul"]
CPU_SCORE_LIMIT = 1 << 28  # "matmul only" materializes T x M fp32 scores: skip it past 1 GB on CPU
NATIVE_MAX_T = 256         # the native kernel has no GEMM blocking: skip it for prefill


def shapes(device: torch.device, quick: bool):
    if device.type == "cuda":
        Ms = [16_384, 65_536] if quick else [16_384, 65_536, 262_144, 1_048_576]
        Ts, Ds, ks = ([1, 4096], [128], [32]) if quick else ([1, 4096], [64, 128], [32, 256])
        return [(T, M, D, k, torch.bfloat16) for T, M, D, k in itertools.product(Ts, Ms, Ds, ks)]
    if quick:
        return [(T, 16_384, 64, 32, torch.float32) for T in (1, 256)]
    decode = [(1, M, D, k) for M, D, k in itertools.product([16_384, 65_536, 262_144, 1_048_576], [64, 128], [32, 256])]
    prefill = [(4096, M, D, k) for M, D, k in itertools.product([16_384, 65_536, 262_144], [64, 128], [32, 256])]
    return [(*shape, torch.float32) for shape in decode + prefill]


def dim_major(keys: torch.Tensor) -> torch.Tensor:
    """The same keys laid out as KNNMemory stores them on CPU."""
    return keys.transpose(-1, -2).contiguous().transpose(-1, -2)


def providers(device: torch.device):
    """name -> builder(q, keys, k) returning a zero-argument callable."""
    out = {}
    if device.type == "cuda":
        out["memlayers"] = lambda q, keys, k: (lambda: knn_search(q, keys, k, backend="triton"))
        out["torch matmul+topk"] = lambda q, keys, k: (lambda: torch.topk(q @ keys.transpose(-1, -2), k, dim=-1))
        compiled = torch.compile(lambda q, keys, k: torch.topk(q @ keys.transpose(-1, -2), k, dim=-1))
        out["torch.compile"] = lambda q, keys, k: (lambda: compiled(q, keys, k))
    else:
        def torch_path(q, keys, k):
            keys = dim_major(keys)
            return lambda: knn_search(q, keys, k, backend="torch")

        out["memlayers"] = torch_path
        out["memlayers slot-major keys"] = lambda q, keys, k: (lambda: knn_search(q, keys, k, backend="torch"))
        from memlayers.ops.knn_search.native import library_path

        if library_path() is not None:  # built with `make native`
            out["memlayers native"] = lambda q, keys, k: (
                (lambda: knn_search(q, keys, k, backend="native")) if q.shape[2] <= NATIVE_MAX_T else None)
    out["matmul only"] = lambda q, keys, k: (lambda: q @ keys.transpose(-1, -2))
    try:
        import faiss
    except ImportError:
        return out

    def faiss_flat(q, keys, k):
        index = faiss.IndexFlatIP(keys.shape[-1])
        if device.type == "cuda":
            if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
                return None
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(keys[0, 0].float().cpu().numpy())
        qn = q[0, 0].float().cpu().numpy()
        return lambda: index.search(qn, k)

    out["faiss flat"] = faiss_flat
    return out


def run_case(T, M, D, k, dtype, device, provider_fns):
    q = torch.randn(1, 1, T, D, device=device, dtype=dtype)
    keys = torch.randn(1, 1, M, D, device=device, dtype=dtype)
    rows = []
    for name, build in provider_fns.items():
        fn = build(q, keys, k)
        if fn is None:
            continue
        limit = 2**31 if device.type == "cuda" else CPU_SCORE_LIMIT
        if T * M > limit and name in ("torch matmul+topk", "torch.compile", "matmul only"):
            rows.append({"T": T, "M": M, "D": D, "k": k, "dtype": str(dtype).replace("torch.", ""),
                         "provider": name, "note": "T x M scores exceed memory"})
            continue
        t = measure(fn, device)
        row = {"T": T, "M": M, "D": D, "k": k, "dtype": str(dtype).replace("torch.", ""), "provider": name, **t}
        row["tflops"] = 2 * T * M * D / (t["ms"] * 1e-3) / 1e12
        peaks = device_peaks()
        if peaks:
            row["peak_fraction"] = row["tflops"] / peaks["tflops_bf16"]
        rows.append(row)
    by = {r["provider"]: r.get("ms") for r in rows}
    for r in rows:
        if r.get("ms") is not None:
            if by.get("torch matmul+topk"):
                r["vs_torch"] = by["torch matmul+topk"] / r["ms"]
            elif by.get("memlayers") and r["provider"] != "memlayers":
                r["vs_torch"] = by["memlayers"] / r["ms"]  # CPU: memlayers is the torch path
            if by.get("faiss flat") and r["provider"] != "faiss flat":
                r["vs_faiss"] = by["faiss flat"] / r["ms"]
            if by.get("matmul only"):
                r["vs_matmul"] = r["ms"] / by["matmul only"]
    return rows


def table(quick: bool = False):
    device = bench_device()
    fns = providers(device)
    rows = []
    for T, M, D, k, dtype in shapes(device, quick):
        rows += run_case(T, M, D, k, dtype, device, fns)
    return rows, COLUMNS + ["note"]


@pytest.mark.parametrize("T, M, D, k, dtype", shapes(bench_device(), quick=True))
@pytest.mark.parametrize("provider", list(providers(bench_device())))
def test_knn_search(benchmark, T, M, D, k, dtype, provider):
    device = bench_device()
    q = torch.randn(1, 1, T, D, device=device, dtype=dtype)
    keys = torch.randn(1, 1, M, D, device=device, dtype=dtype)
    fn = providers(device)[provider](q, keys, k)
    if fn is None:
        pytest.skip(f"{provider} unavailable here")
    stats = measure(fn, device)
    benchmark.extra_info.update(stats)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
