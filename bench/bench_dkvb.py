"""DKVB: fused lookup vs the naive path vs the pip package discrete-key-value-bottleneck-pytorch.

    python bench/run.py --op dkvb            # table, writes bench/results/dkvb-<cpu|gpu>.json
    pytest bench/bench_dkvb.py               # pytest-benchmark (timings via common.measure)

GPU shape is the paper's: batch 256, C = 256 codebooks, N = 4096 keys, key dim 14, value dim 10
(input features 1024, fixed random projection, voting decoder, fp32). Two levels:
- ``lookup``: the operator alone (queries already projected), ours (Triton) vs the naive path;
- ``layer``: the whole bottleneck (projection, lookup, mean over codebooks), ours vs the pip package
  (frozen codebook, no EMA updates), forward and forward+backward, with peak memory.
On CPU the same rows run at small sizes; "ours" is then the naive path (the interpreter is no timing).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench_device, measure, peak_memory_bytes  # noqa: E402

from memlayers.layers.dkvb import DiscreteKeyValueBottleneck  # noqa: E402
from memlayers.ops.dkvb import dkvb_lookup  # noqa: E402

COLUMNS = ["level", "B", "C", "N", "Dk", "Dv", "topk", "provider", "pass", "ms", "ms_p20", "ms_p80",
           "peak_mb", "speedup_vs_pip", "mem_vs_pip", "note"]
IN_DIM = 1024


def shapes(device: torch.device, quick: bool):
    """(B, C, N, Dk, Dv, topk)."""
    if device.type == "cuda":
        return [(256, 256, 4096, 14, 10, 1)] + ([] if quick else [(256, 256, 4096, 14, 10, 4)])
    return [(64, 32, 512, 14, 10, 1)] + ([] if quick else [(256, 64, 1024, 14, 10, 1)])


def pip_bottleneck(C, N, Dk, Dv, device):
    try:
        from discrete_key_value_bottleneck_pytorch import DiscreteKeyValueBottleneck as PipDKVB
    except ImportError:
        return None
    module = PipDKVB(dim=Dk, num_memories=N, num_memory_codebooks=C, dim_embed=IN_DIM, dim_memory=Dv,
                     freeze_codebook=True)
    return module.to(device)


def layer_providers(B, C, N, Dk, Dv, topk, device):
    """name -> (module, input); every module maps the input to [B, Dv] (mean over codebooks)."""
    x = torch.randn(B, IN_DIM, device=device)
    out = {}
    for name, backend in (("ours triton", "triton"), ("ours naive", "torch")):
        if backend == "triton" and device.type != "cuda":
            continue
        m = DiscreteKeyValueBottleneck(IN_DIM, C, N, key_dim=Dk, value_dim=Dv, topk=topk, backend=backend).to(device)
        with torch.no_grad():
            m.values.normal_()
        m.freeze_keys()
        out[name] = (m, x)
    if topk == 1:  # the pip package fetches one value per codebook
        pip = pip_bottleneck(C, N, Dk, Dv, device)
        if pip is not None:
            out["pip dkvb"] = (pip, x[:, None, :])
    return out


def passes(module, x):
    def fwd():
        with torch.no_grad():
            return module(x)

    def fwd_bwd():
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        y.float().square().mean().backward()
        module.zero_grad(set_to_none=True)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def lookup_rows(B, C, N, Dk, Dv, topk, device):
    q = torch.randn(B, C, Dk, device=device)
    keys = torch.randn(C, N, Dk, device=device)
    values = torch.randn(C, N, Dv, device=device, requires_grad=True)
    rows = []
    backends = ["triton", "torch"] if device.type == "cuda" else ["torch"]
    for backend in backends:
        def fwd():
            with torch.no_grad():
                return dkvb_lookup(q, keys, values, topk, backend=backend)

        def fwd_bwd():
            out, _ = dkvb_lookup(q, keys, values, topk, backend=backend)
            out.square().mean().backward()
            values.grad = None

        for name, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            t = measure(fn, device)
            peak = peak_memory_bytes(fn, device)
            rows.append({"level": "lookup", "B": B, "C": C, "N": N, "Dk": Dk, "Dv": Dv, "topk": topk,
                         "provider": "ours " + ("triton" if backend == "triton" else "naive"), "pass": name, **t,
                         "peak_mb": peak / 2**20 if peak is not None else None})
    return rows


def layer_rows(B, C, N, Dk, Dv, topk, device):
    rows = []
    for provider, (module, x) in layer_providers(B, C, N, Dk, Dv, topk, device).items():
        module.train()
        for name, fn in passes(module, x).items():
            try:
                t = measure(fn, device)
                peak = peak_memory_bytes(fn, device)
            except torch.OutOfMemoryError:
                rows.append({"level": "layer", "B": B, "C": C, "N": N, "Dk": Dk, "Dv": Dv, "topk": topk,
                             "provider": provider, "pass": name, "note": "out of memory"})
                torch.cuda.empty_cache()
                continue
            rows.append({"level": "layer", "B": B, "C": C, "N": N, "Dk": Dk, "Dv": Dv, "topk": topk,
                         "provider": provider, "pass": name, **t,
                         "peak_mb": peak / 2**20 if peak is not None else None})
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()
    pip = {r["pass"]: r for r in rows if r["provider"] == "pip dkvb" and r.get("ms") is not None}
    for r in rows:
        ref = pip.get(r["pass"])
        if ref and r.get("ms") is not None:
            r["speedup_vs_pip"] = ref["ms"] / r["ms"]
            if ref.get("peak_mb") and r.get("peak_mb"):
                r["mem_vs_pip"] = ref["peak_mb"] / r["peak_mb"]
    return rows


def table(quick: bool = False):
    device = bench_device()
    rows = []
    for shape in shapes(device, quick):
        rows += lookup_rows(*shape, device)
        rows += layer_rows(*shape, device)
    if device.type != "cuda":
        for r in rows:
            r["note"] = (r.get("note") or "") + "cpu: ours = naive path (Triton needs CUDA for timing)"
    return rows, COLUMNS


@pytest.mark.parametrize("pass_name", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["ours triton", "ours naive", "pip dkvb"])
def test_dkvb_layer(benchmark, provider, pass_name):
    device = bench_device()
    shape = shapes(device, quick=True)[0]
    found = layer_providers(*shape, device)
    if provider not in found:
        pytest.skip(f"{provider} unavailable here")
    module, x = found[provider]
    fn = passes(module, x)[pass_name]
    benchmark.extra_info.update(measure(fn, device))
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
