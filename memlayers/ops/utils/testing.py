"""Helpers for comparing kernels with their naive references (used by tests and benchmarks)."""
from __future__ import annotations

import torch

# Relative-error tolerances of docs/design.md, by the dtype the kernel computed in.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp64 (0 when both are zero)."""
    out = out.detach().double()
    ref = ref.detach().double()
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        return num
    return num / den


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "output") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert bool(torch.isfinite(out).all()), f"{name}: non-finite values (unwritten or overflowed elements)"
    err = rel_err(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def poison_(x: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the int minimum) so that elements a kernel fails to write are caught."""
    if x.is_floating_point():
        return x.fill_(float("nan"))
    return x.fill_(torch.iinfo(x.dtype).min)
