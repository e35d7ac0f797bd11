"""Titans memory benchmarks: forward and forward+backward tokens/s, peak memory.

``python bench/run.py --op titans [--quick]`` prints the table and writes bench/results/titans-<cpu|gpu>.json;
``pytest bench/bench_titans.py`` runs the pytest-benchmark cases.

Providers (each skipped where it cannot run):
- ``memlayers-triton``: ``ml.NeuralMemory`` on the Triton kernels (CUDA only; the interpreter is not timed).
- ``memlayers-torch``:  the same module on the naive chunked PyTorch path (the reference).
- ``titans-pytorch``:   the pip package's ``NeuralMemory`` with the same width, heads, chunk size and
  memory (``MemoryMLP`` depth 1 = linear, depth 2 expansion 2 = MLP).
- ``fla-gated-delta``:  flash-linear-attention's ``chunk_gated_delta_rule`` (GPU), compared with the
  linear memory without momentum (the same recurrence as a gated delta rule) at the operator level,
  next to ``memlayers-triton-op`` (``titans_memory`` alone, without projections).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_device, measure, peak_memory_bytes  # noqa: E402

import memlayers.layers.neural_memory as nm  # noqa: E402
from memlayers.ops.titans import titans_memory  # noqa: E402

COLUMNS = ["memory", "provider", "mode", "B", "H", "D", "T", "ms", "ms_p20", "ms_p80", "tokens_per_s", "peak_MB", "note"]


def _ours(dim, heads, memory, chunk, backend, device):
    return nm.NeuralMemory(dim, heads=heads, memory=memory, chunk_size=chunk, backend=backend).to(device)


def _theirs(dim, heads, memory, chunk, device):
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
    except ImportError:
        return None
    model = MemoryMLP(dim=dim // heads, depth=1 if memory == "linear" else 2, expansion_factor=2.0)
    return NeuralMemory(dim, chunk_size=chunk, heads=heads, dim_head=dim // heads, model=model).to(device)


def _module_step(module, x, backward):
    # Ours returns the output alone when asked to; titans-pytorch returns (y, state).
    kwargs = {"return_state": False} if isinstance(module, nm.NeuralMemory) else {}

    def run():
        out = module(x, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        if backward:
            y.float().square().mean().backward()
        return y

    return run


def _row(memory, provider, mode, B, H, D, T, fn, device, note=""):
    try:
        t = measure(fn, device)
        peak = peak_memory_bytes(fn, device)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # e.g. out of memory at 32K tokens
        return dict(memory=memory, provider=provider, mode=mode, B=B, H=H, D=D, T=T, note=f"failed: {str(err)[:60]}")
    return dict(
        memory=memory, provider=provider, mode=mode, B=B, H=H, D=D, T=T, **t,
        tokens_per_s=B * T / (t["ms"] / 1000.0), peak_MB=None if peak is None else peak / 2**20, note=note,
    )


def _op_rows(B, H, D, T, chunk, device, dtype):
    """Linear memory without momentum vs fla's chunk_gated_delta_rule, operator level (GPU)."""
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)

    q = torch.nn.functional.normalize(rnd(B, H, T, D), dim=-1).to(dtype).requires_grad_()
    k = torch.nn.functional.normalize(rnd(B, H, T, D), dim=-1).to(dtype).requires_grad_()
    v = rnd(B, H, T, D).to(dtype).requires_grad_()
    beta = torch.full((B, H, T), 0.5, device=device, requires_grad=True)
    decay = torch.full((B, H, T), 0.01, device=device, requires_grad=True)
    w0 = torch.zeros(B, H, D, D, device=device)

    def ours(backward):
        def run():
            y, _, _ = titans_memory(q, k, v, beta / 2, (w0,), alpha=decay, chunk_size=chunk, backend="triton")
            if backward:
                y.float().square().mean().backward()
        return run

    for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
        rows.append(_row("linear(no momentum)", "memlayers-triton-op", mode, B, H, D, T, ours(bwd), device))
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError:
        return rows
    # fla layout [B, T, H, D]; log-decay g = log(1 - alpha).
    qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    gf = torch.log1p(-decay.detach()).transpose(1, 2).contiguous().requires_grad_()
    bf = beta.detach().transpose(1, 2).contiguous().requires_grad_()

    def theirs(backward):
        def run():
            o, _ = chunk_gated_delta_rule(qf, kf, vf, gf, bf)
            if backward:
                o.float().square().mean().backward()
        return run

    for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
        rows.append(_row("linear(no momentum)", "fla-gated-delta", mode, B, H, D, T, theirs(bwd), device))
    return rows


def table(quick: bool = False):
    device = bench_device()
    gpu = device.type == "cuda"
    if gpu:
        B, H, D, chunk = 16, 8, 64, 64
        lengths = [2048] if quick else [2048, 8192, 32768]
        dtype = torch.bfloat16
    else:
        B, H, D, chunk = 1, 2, 32, 64
        lengths = [256] if quick else [256, 1024]
        dtype = torch.float32
    dim = H * D
    rows = []
    for memory in ("linear", "mlp"):
        for T in lengths:
            x = torch.randn(B, T, dim, device=device)
            providers = [("memlayers-torch", lambda: _ours(dim, H, memory, chunk, "torch", device))]
            if gpu:
                providers.insert(0, ("memlayers-triton", lambda: _ours(dim, H, memory, chunk, "triton", device)))
            providers.append(("titans-pytorch", lambda: _theirs(dim, H, memory, chunk, device)))
            for name, make in providers:
                if name == "memlayers-torch" and gpu and T > 8192:
                    continue  # the reference's per-chunk Python loop is not a GPU contender at 32K
                module = make()
                if module is None:
                    rows.append(dict(memory=memory, provider=name, T=T, note="not installed"))
                    continue
                for mode, bwd in (("fwd", False), ("fwd+bwd", True)):
                    ctx = torch.enable_grad() if bwd else torch.no_grad()
                    with ctx:
                        rows.append(_row(memory, name, mode, B, H, D, T, _module_step(module, x, bwd), device,
                                         note="" if gpu else "device=cpu"))
                del module
        if gpu:
            torch.cuda.empty_cache()
    if gpu:
        for T in lengths:
            rows += _op_rows(B, H, D, T, chunk, device, dtype)
    return rows, COLUMNS


# ------------------------------------------------------------------ pytest-benchmark cases (small)
def _bench_module(benchmark, memory, backward):
    device = bench_device()
    module = _ours(64, 2, memory, 64, "auto" if device.type == "cuda" else "torch", device)
    x = torch.randn(1, 512, 64, device=device)
    fn = _module_step(module, x, backward)
    if device.type == "cuda":
        stats = measure(fn, device)
        benchmark.extra_info.update(stats)
    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        out = benchmark(fn)
    assert torch.isfinite(out).all()


def test_titans_linear_fwd(benchmark):
    _bench_module(benchmark, "linear", False)


def test_titans_mlp_fwd_bwd(benchmark):
    _bench_module(benchmark, "mlp", True)
