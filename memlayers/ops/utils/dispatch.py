"""Choosing an operator's compute backend: the Triton kernels, the naive PyTorch path, or a native one.

Rule (docs/design.md): Triton for CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET=1``; the naive
path otherwise. ``backend="torch"|"triton"`` forces one, and so does the ``MEMLAYERS_BACKEND``
environment variable when the caller left ``backend="auto"``. ``backend="native"`` picks an op's
optional CMake-built CPU library; only the ops listed in ``NATIVE_OPS`` have one, and ``"auto"``
never picks it.

Triton modules are imported lazily: triton reads ``TRITON_INTERPRET`` when a kernel is decorated,
and ``import memlayers`` must work where triton is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "native")
# Ops with a native CPU backend (kernels/, built by `make native`).
NATIVE_OPS = frozenset({"knn_search"})


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve_backend(backend: str, *tensors: torch.Tensor, op: Optional[str] = None) -> str:
    """Return ``"torch"``, ``"triton"`` or ``"native"`` for these tensors.

    Args:
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"`` (ops in ``NATIVE_OPS`` only).
        tensors: the operator's inputs; their device decides ``"auto"``.
        op: the operator's name (e.g. ``"knn_search"``), which decides whether ``"native"`` exists.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "native":
        if op not in NATIVE_OPS:
            have = ", ".join(sorted(NATIVE_OPS))
            raise ValueError(f"backend='native' exists for {have} only, not for {op or 'this op'}")
        if not all(t.device.type == "cpu" for t in tensors):
            raise ValueError("backend='native' runs on CPU tensors only")
        return backend
    if backend == "auto":
        forced = os.environ.get("MEMLAYERS_BACKEND", "").strip().lower()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(f"MEMLAYERS_BACKEND must be 'torch' or 'triton', got {forced!r}")
            backend = forced
    if backend == "auto":
        on_cuda = any(t.is_cuda for t in tensors)
        if triton_installed() and (on_cuda or interpreter_enabled()):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_installed():
            raise RuntimeError("backend='triton' needs the triton package (pip install memlayers[triton])")
        if not interpreter_enabled() and not all(t.is_cuda for t in tensors):
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before memlayers' "
                "kernels are first used for CPU tensors"
            )
    return backend


def load_triton_module(name: str):
    """Import ``memlayers.ops.<name>.triton`` on first use."""
    return importlib.import_module(f"memlayers.ops.{name}.triton")
