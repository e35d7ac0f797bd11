"""Choosing between the Triton kernels and the naive PyTorch path.

Rule (DESIGN.md): Triton for CUDA tensors, or for CPU tensors when ``TRITON_INTERPRET=1``; the naive
path otherwise. ``backend="torch"|"triton"`` forces one, and so does the ``MEMLAYERS_BACKEND``
environment variable when the caller left ``backend="auto"``.

Triton modules are imported lazily: triton reads ``TRITON_INTERPRET`` when a kernel is decorated,
and ``import memlayers`` must work where triton is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for these tensors.

    Args:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        tensors: the operator's inputs; their device decides ``"auto"``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
