"""The Titans kernels fit the GPUs they are written for: compiled for real (no interpreter) for sm_90
and sm_80 at the specializations the host code chooses, shared memory within the block limit.

Launches are captured from the host functions themselves (``titans_memory_fwd`` / ``_bwd`` on meta
tensors, kernels' ``run`` replaced by a recorder), so the tiles, warps and matmul dtypes checked
are exactly the ones a call would launch. Compiling needs no GPU, only Triton's bundled ptxas; the
compile runs in a subprocess because the interpreter (TRITON_INTERPRET=1, how this suite runs the
kernels on CPU) replaces ``triton.jit`` functions with Python ones that cannot be compiled.

Full sweep (every head dim, dtype, hidden size, direction, arch; a table on stdout):
    python tests/ops/test_titans_fit.py --sweep
Under the GPU image's Triton: ``PYTHONPATH=.triton36 python tests/ops/test_titans_fit.py --sweep``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

# Shared memory per block (opt-in maximum): H100/H200 and A100.
SHARED_LIMIT = {90: 232448, 80: 166912}
HEAD_DIMS = (16, 32, 64, 80, 128, 256)
DTYPES = ("float32", "bfloat16", "float16")


def _launches(kind: str, direction: str, D: int, dtype: str, hidden: int, chunk: int = 64):
    """The distinct memory-kernel launches ``(kernel, args, kwargs)`` the host code makes for this call
    (meta tensors: nothing runs)."""
    import torch

    import memlayers.ops.titans.triton as host

    captured = []
    kernels = [host.titans_linear_fwd_kernel, host.titans_linear_bwd_recompute_kernel, host.titans_linear_bwd_kernel,
               host.titans_linear_bwd_prep_kernel, host.titans_linear_bwd_grads_kernel,
               host.titans_mlp_fwd_state_kernel, host.titans_mlp_fwd_retrieve_kernel, host.titans_mlp_bwd_recompute_kernel,
               host.titans_mlp_queries_kernel, host.titans_mlp_bwd_queries_grad_kernel, host.titans_mlp_bwd_dq_kernel,
               host.titans_mlp_bwd_retrieval_kernel, host.titans_mlp_bwd_start_share_kernel, host.titans_mlp_bwd_kernel,
               host.titans_mlp_bwd_dk_kernel, host.titans_mlp_bwd_grads_kernel,
               host.titans_gates_fwd_kernel, host.titans_gates_bwd_kernel]
    saved = [k.__dict__.get("run") for k in kernels]
    for k in kernels:
        k.run = (lambda k: lambda *a, grid=None, warmup=False, **kw: captured.append((k, a, kw)))(k)
    try:
        dt, m = getattr(torch, dtype), "meta"
        B, H, T = 1, 2, 4 * chunk
        x = torch.empty(B, H, T, D, dtype=dt, device=m)
        gate = torch.empty(B, H, T, device=m)
        if kind == "linear":
            weights = (torch.empty(B, H, D, D, device=m),)
        else:
            weights = (torch.empty(B, H, D, hidden, device=m), torch.empty(B, H, hidden, D, device=m))
        prec = host._precision(dt, False)
        y, wt, st, ckpt, g = host.titans_memory_fwd(
            x, x, x, gate, gate, gate, weights, weights, chunk, "l2", 3.0, 1.0, 1e-6, prec)
        if direction == "bwd":
            host.titans_memory_bwd(
                x, x, x, gate, gate, gate, ckpt, g, y, list(wt), list(st), True, "l2", 3.0, 1.0, 1e-6, prec)
    finally:
        for k, r in zip(kernels, saved):
            if r is None:
                del k.run
            else:
                k.run = r
    # The memory kernels (the gate kernels that run around them hold [C, C] tiles at most), each
    # specialization once (they are launched once per checkpoint segment).
    distinct = {}
    for fn, args, kw in captured:
        if "_gates_" not in fn.fn.__name__:
            distinct.setdefault((fn.fn.__name__, tuple(sorted((n, str(v)) for n, v in kw.items()))), (fn, args, kw))
    return list(distinct.values())


def _signature(fn, args, kwargs):
    import torch

    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({n: v for n, v in kwargs.items() if n in names})
    ptr = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
    sig, constexprs = {}, {}
    for i, n in enumerate(names):
        v = values[n]
        if fn.params[i].is_constexpr:
            sig[n], constexprs[n] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[n] = ptr[v.dtype]
        else:
            sig[n] = "i32" if isinstance(v, int) else "fp32"
    return sig, constexprs


def _resources(cubin: bytes, cc: int) -> dict:
    """Registers, local (spill) memory and stack per thread, from the cubin (bundled cuobjdump)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = os.path.join(os.path.dirname(get_ptxas(cc).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", out).group(1))  # noqa: E731
    return dict(regs=field("REG"), local=field("LOCAL"), stack=field("STACK"))


def compile_spec(kind, direction, D, dtype, hidden, cc, chunk=64) -> dict:
    """Compile the call's memory kernels for ``sm_<cc>``: the one with the most shared memory (bytes),
    with its per-thread resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    results = []
    for fn, args, kwargs in _launches(kind, direction, D, dtype, hidden, chunk):
        sig, constexprs = _signature(fn, args, kwargs)
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                  target=GPUTarget("cuda", cc, 32), options=opts)
        sizes = {n: kwargs[n] for n in ("BV", "BHB", "num_warps") if n in kwargs}
        results.append(dict(kind=kind, direction=direction, D=D, dtype=dtype, hidden=hidden, cc=cc, chunk=chunk,
                            kernel=fn.fn.__name__, shared=compiled.metadata.shared, triton=triton.__version__,
                            **sizes, **_resources(compiled.asm["cubin"], cc)))
    return max(results, key=lambda r: r["shared"])


def _compile_in_subprocess(specs) -> list:
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, __file__, "--json", json.dumps(specs)], capture_output=True, text=True,
                         env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _can_compile() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # no CUDA backend in this Triton build
        return False


# Shared memory of a call = the most any of its memory kernels takes (bf16, Triton 3.9, measured after the
# MLP kernels were split, issue 13): the MLP forward + backward at head dim 128, hidden 512, 64-token
# chunks, 73,728 bytes for sm_90 (the forward's state kernel) and 98,304 for sm_80 (the backward's
# queries kernel); at head dim 256, hidden 1024, 32-token chunks, 98,304 for both. One compile per
# arch keeps this test within the suite's budget (Triton caches it by source hash afterwards).
LARGEST = ("mlp", "bwd", 128, "bfloat16", 512)


@pytest.mark.slow
@pytest.mark.skipif(not _can_compile(), reason="this Triton build cannot compile for CUDA (no nvidia backend/ptxas)")
# Opt-in: a cold compile of this kernel took 7-8 minutes per arch on the shared 2-core CPU VM
# (15 min for both, measured), beyond the suite's budget; the compile gate or a GPU run sets it.
@pytest.mark.skipif(os.environ.get("MEMLAYERS_TITANS_FIT") != "1", reason="set MEMLAYERS_TITANS_FIT=1 (cold compile: minutes)")
@pytest.mark.parametrize("cc", [90, 80])
def test_largest_titans_kernel_fits_in_shared_memory(cc):
    (r,) = _compile_in_subprocess([list(LARGEST) + [cc]])
    assert r["shared"] <= SHARED_LIMIT[cc], f"{r} needs more shared memory than sm_{cc} has"


def _sweep():
    specs = []
    for kind in ("linear", "mlp"):
        for D in HEAD_DIMS:
            for hidden in ([D] if kind == "linear" else sorted({D, 4 * D})):
                for dtype in DTYPES:
                    for direction in ("fwd", "bwd"):
                        for cc in (90, 80):
                            # The host sends MLP heads past 128 to the kernels with chunks up to 32 only.
                            chunk = 32 if kind == "mlp" and D > 128 else 64
                            specs.append((kind, direction, D, dtype, hidden, cc, chunk))
    print(f"{'kind':6} {'dir':3} {'D':>3} {'hidden':>6} {'dtype':8} {'sm':>2} {'C':>2} {'shared':>7} {'regs':>4} "
          f"{'stack':>5} {'fits':>4}", flush=True)
    for s in specs:
        r = compile_spec(*s)
        fits = r["shared"] <= SHARED_LIMIT[r["cc"]]
        print(f"{r['kind']:6} {r['direction']:3} {r['D']:>3} {r['hidden']:>6} {r['dtype']:8} {r['cc']:>2} {r['chunk']:>2} "
              f"{r['shared']:>7} {r['regs']:>4} {r['stack']:>5} {'yes' if fits else 'NO':>4}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--json"]:
        print(json.dumps([compile_spec(*s) for s in json.loads(sys.argv[2])]))
    elif sys.argv[1:2] == ["--sweep"]:
        _sweep()
    else:
        sys.exit(__doc__)
