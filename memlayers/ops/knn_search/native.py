"""knn_search through the optional native CPU library (kernels/knn_topk_cpu.cpp, built by CMake).

The library is looked up at ``MEMLAYERS_NATIVE_LIB`` or at ``build/libmemlayers_kernels.so`` beside
the package's source tree, and loaded with ctypes on first use. fp32 CPU tensors only.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional, Tuple

import torch

LIB_NAME = "libmemlayers_kernels.so"


def library_path() -> Optional[Path]:
    env = os.environ.get("MEMLAYERS_NATIVE_LIB")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[3] / "build" / LIB_NAME
    return candidate if candidate.exists() else None


@lru_cache(maxsize=4)
def _load(path: str):
    lib = ctypes.CDLL(path)
    fn = lib.memlayers_knn_topk_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64, i64, ptr, ctypes.c_float, i64, ptr, ptr]
    fn.restype = ctypes.c_int
    return fn


def knn_search_native_lib(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    valid_lengths: Optional[torch.Tensor] = None,
    metric: str = "ip",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [B, Hq, T, D], keys [B, Hkv, M, D] fp32 CPU -> (scores [B, Hq, T, k] fp32, indices [B, Hq, T, k] int64)."""
    path = library_path()
    if path is None or not path.exists():
        raise RuntimeError("backend='native' needs the native library: build it with `make native` "
                           "(or set MEMLAYERS_NATIVE_LIB to libmemlayers_kernels.so)")
    if queries.dtype != torch.float32 or queries.device.type != "cpu":
        raise ValueError(f"backend='native' takes fp32 CPU tensors, got {queries.dtype} on {queries.device}")
    fn = _load(str(path))
    B, Hq, T, D = queries.shape
    Hkv, M = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    q = queries.detach().reshape(B, Hkv, group * T, D).contiguous()
    kf = keys.detach().contiguous()
    bias = None
    scale = 1.0
    if metric == "cosine":
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kf = kf / kf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    elif metric == "l2":
        bias = -kf.pow(2).sum(-1).contiguous()  # [B, Hkv, M]
        scale = 2.0
    if valid_lengths is None:
        lengths = torch.full((B, Hkv), M, dtype=torch.long)
    else:
        lengths = valid_lengths.to(torch.long).cpu()
        lengths = (lengths[:, None].expand(B, Hkv) if lengths.dim() == 1 else lengths).clamp(0, M)
    R = group * T
    scores = torch.empty(B, Hkv, R, k, dtype=torch.float32)
    idx = torch.empty(B, Hkv, R, k, dtype=torch.int64)
    for b in range(B):
        for h in range(Hkv):
            status = fn(q[b, h].data_ptr(), R, kf[b, h].data_ptr(), int(lengths[b, h]), D,
                        bias[b, h].data_ptr() if bias is not None else None, scale, k,
                        scores[b, h].data_ptr(), idx[b, h].data_ptr())
            if status != 0:
                raise RuntimeError(f"native knn search failed with status {status}")
    missing = scores == float("-inf")  # the library skips NaN scores; -inf is no match either
    if metric == "l2":  # the per-query constant -||q||^2 does not change the ranking
        scores = (scores - q.pow(2).sum(-1, keepdim=True)).masked_fill_(missing, float("-inf"))
    idx.masked_fill_(missing, -1)
    return scores.reshape(B, Hq, T, k), idx.reshape(B, Hq, T, k)
