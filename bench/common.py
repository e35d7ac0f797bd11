"""Shared benchmark plumbing: timing, peak memory, machine info, results files.

GPU timings use ``triton.testing.do_bench`` (CUDA events; median with 20/80 quantiles) because a host
clock does not wait for the GPU. On CPU the same statistics come from ``time.perf_counter`` over
repeated calls. Every shape is run once before timing (autotuning, allocator warm-up).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Dense peak figures used for "fraction of peak" columns (bf16 tensor-core TFLOP/s, HBM GB/s).
DEVICE_PEAKS = {
    "H100": {"tflops_bf16": 989.0, "gbps": 3350.0},
    "H200": {"tflops_bf16": 989.0, "gbps": 4800.0},
}


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 1, rep_ms: float = 200.0) -> Dict[str, float]:
    """Median and 20/80 quantiles of ``fn``'s run time in milliseconds."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=25, rep=int(rep_ms), quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    times: List[float] = []
    budget = rep_ms / 1000.0
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak CUDA memory allocated during ``fn`` above what was allocated before (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def device_peaks() -> Optional[Dict[str, float]]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in DEVICE_PEAKS.items():
        if key in name:
            return peaks
    return None


def machine_info() -> Dict[str, object]:
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def write_results(name: str, rows: List[Dict[str, object]]) -> Path:
    """Write ``bench/results/<name>-<device>.json`` with the machine info and the rows."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if torch.cuda.is_available() else "cpu"
    path = RESULTS_DIR / f"{name}-{tag}.json"
    path.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2, default=str) + "\n")
    return path


def format_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
