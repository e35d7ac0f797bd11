"""Shared pieces of the fuzz suite: deterministic hypothesis settings, backends, tensors, tolerances.

Every fuzz test draws its sizes and a seed with hypothesis (``derandomize=True``: the same examples on
every run, no example database), builds the tensors from that seed, and compares the op with a
brute-force fp64 reference written here, independent of the op's own naive path.
"""
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from memlayers.ops.utils import interpreter_enabled, triton_installed

_COMMON = dict(derandomize=True, deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# The torch paths are cheap; the Triton interpreter costs ~0.2-0.4 s a call on the 2-core VM.
FUZZ_TORCH = settings(max_examples=30, **_COMMON)
FUZZ_TRITON = settings(max_examples=6, **_COMMON)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative error of outputs against the fp64 reference, by input dtype: the ops compute in fp32 and
# return low-precision outputs in the input dtype (docs/design.md's tolerances).
OUT_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Gradients of fp32 inputs against fp64 autograd: sums of up to a few hundred fp32 products.
GRAD_TOL = 1e-4


def backends():
    """The backends this machine can run: torch always, Triton on CUDA or under TRITON_INTERPRET=1."""
    have_triton = triton_installed() and (torch.cuda.is_available() or interpreter_enabled())
    return ["torch", "triton"] if have_triton else ["torch"]


def fuzz_settings(backend):
    return FUZZ_TRITON if backend == "triton" else FUZZ_TORCH


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def draw(data, strategy, label):
    return data.draw(strategy, label=label)


def size(data, label, lo, hi):
    return draw(data, st.integers(lo, hi), label)


def randn(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device=device(), dtype=dtype)


def generator(data):
    return torch.Generator().manual_seed(draw(data, st.integers(0, 2**31 - 1), "seed"))


def rel_err(out, ref):
    """``||out - ref|| / ||ref||`` over finite reference entries, in fp64 (absolute when ref is 0)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return num / den if den > 0 else num


def assert_close(out, ref, tol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.equal(out64.isnan(), ref64.isnan()), f"{what}: NaN where the reference has none (or the reverse)"
    finite = torch.isfinite(ref64)
    assert torch.equal(out64[~finite & ~ref64.isnan()], ref64[~finite & ~ref64.isnan()]), f"{what}: infinities differ"
    err = rel_err(out64[finite], ref64[finite])
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
