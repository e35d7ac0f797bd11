"""``make gpu-check``: on a machine with a CUDA GPU and no network, one command that answers issue 13.

    PYTHONPATH=. python3 bench/gpu_check.py              # the GPU run (under 8 minutes on an H100/H200)
    PYTHONPATH=. python3 bench/gpu_check.py --dry-run    # the same code paths on CPU at tiny sizes

It uses the python, torch, triton and transformers installed there (no virtualenv, no pip, no
download) and runs, each step in its own process under its own time budget, all inside one hard
deadline:
1. the ``gpu`` tests (``pytest -m gpu tests``);
2. every kernel family's benchmark at the issue's target shapes against its peers (peers that are not
   installed are reported as "not installed"; they never fail the run).
Each step writes ``bench/results/<step>-gpu.json`` as its rows come in (a step cut off by its budget
keeps what it measured), then one table of measured against target is printed and written to
``bench/results/gpu-check-gpu.json``. GPU timings come from ``triton.testing.do_bench`` (common.measure).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
# Steps run in forked children that inherit the imports below; asking whether CUDA is there through NVML
# leaves the parent without a CUDA context, which a fork must not inherit.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

DEADLINE_S = 480.0  # the whole check, start to table
# Seconds per step on an H100/H200: the sum stays under the deadline with room for start-up.
BUDGETS_S = {"gpu-tests": 120, "knn_search": 45, "memory_attention": 45, "titans": 90, "dkvb": 40, "pkm": 40,
             "hf": 70}


# ----------------------------------------------------------------------------------------------- steps
# A step is a list of stages; each stage returns rows (dicts). Stages run in order in a child process
# that rewrites the step's JSON after every stage.

def knn_search_stages(tiny: bool):
    import torch
    import bench_knn_search as b
    from common import bench_device

    device = bench_device()
    T, M, D, k, dtype = (16, 2048, 32, 8, torch.float32) if tiny else (4096, 262_144, 128, 32, torch.bfloat16)
    wanted = ("memlayers", "torch matmul+topk", "matmul only")
    fns = {name: fn for name, fn in b.providers(device).items() if name in wanted}
    return [lambda: b.run_case(T, M, D, k, dtype, device, fns)]


def memory_attention_stages(tiny: bool):
    import torch
    import bench_memory_attention as b
    from common import bench_device

    device = bench_device()
    shape, dtype = ((32, 1024, 8, 2, 32), torch.float32) if tiny else ((2048, 262_144, 32, 16, 128), torch.bfloat16)
    return [lambda: b.op_rows(device, shape, dtype)]


def titans_stages(tiny: bool):
    import torch
    import bench_titans as b
    from common import bench_device

    device = bench_device()
    gpu = device.type == "cuda"
    B, H, D, T, chunk = (1, 2, 16, 64, 16) if tiny else (16, 8, 64, 8192, 64)
    dtype = torch.bfloat16 if gpu else torch.float32
    backend = "triton" if gpu else "torch"

    def mlp_rows():
        rows = []
        x = torch.randn(B, T, H * D, device=device)
        for name, make in ((f"memlayers-{backend}", lambda: b._ours(H * D, H, "mlp", chunk, backend, device)),
                           ("titans-pytorch", lambda: b._theirs(H * D, H, "mlp", chunk, device))):
            module = make()
            if module is None:
                rows.append(dict(memory="mlp", provider=name, T=T, note="not installed"))
                continue
            rows.append(b._row("mlp", name, "fwd+bwd", B, H, D, T, b._module_step(module, x, True), device))
            del module
        return rows

    def linear_rows():
        rows = b._op_rows(B, H, D, T, chunk, device, dtype) if gpu else []
        if not any(r["provider"] == "fla-gated-delta" for r in rows):
            rows.append(dict(memory="linear(no momentum)", provider="fla-gated-delta", T=T, note="not installed"))
        return rows

    return [mlp_rows, linear_rows]


def dkvb_stages(tiny: bool):
    import bench_dkvb as b
    from common import bench_device

    device = bench_device()
    shape = (8, 4, 64, 14, 10, 1) if tiny else b.shapes(device, quick=True)[0]

    def rows():
        out = b.layer_rows(*shape, device)
        if not any(r["provider"] == "pip dkvb" for r in out):
            out.append({"level": "layer", "provider": "pip dkvb", "note": "not installed"})
        return out

    return [rows]


def pkm_stages(tiny: bool):
    import torch
    import bench_pkm as b
    from common import bench_device

    device = bench_device()
    shape = (64, 16, 32, 2, 4, torch.float32) if tiny else b.shape(device, quick=True)
    return [lambda: b.gather_rows(*shape, device)]


def hf_stages(tiny: bool):
    import bench_hf as b

    return [lambda: b.table(quick=tiny)[0]]


STEPS: Dict[str, Callable[[bool], List[Callable[[], List[dict]]]]] = {
    "knn_search": knn_search_stages, "memory_attention": memory_attention_stages, "titans": titans_stages,
    "dkvb": dkvb_stages, "pkm": pkm_stages, "hf": hf_stages,
}


# --------------------------------------------------------------------------------------------- targets

def _one(rows, **match) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _ratio(num: Optional[dict], den: Optional[dict], key: str = "ms") -> Optional[float]:
    if not num or not den or num.get(key) is None or den.get(key) is None:
        return None
    return num[key] / den[key]


def _status(peer: Optional[dict]) -> Optional[str]:
    """Why a comparison has no number: its peer is not installed, or it has not been measured."""
    if peer is not None and peer.get("note") == "not installed":
        return "not installed"
    return None


def targets(results: Dict[str, List[dict]]) -> List[dict]:
    """One line per target of issue 13: measured value, the bar, and whether it is met (None: no number)."""
    out = []

    def add(name, measured, bar, higher_is_better, why=None):
        met = None if measured is None else (measured >= bar if higher_is_better else measured <= bar)
        out.append({"target": name, "measured": measured, "bar": (">= " if higher_is_better else "<= ") + f"{bar:g}",
                    "met": met, "note": why or ("" if measured is not None else "not measured")})

    knn = results.get("knn_search", [])
    ours = _one(knn, provider="memlayers")
    add("knn_search T=4096 M=256K D=128 k=32: speedup vs torch matmul+topk",
        _ratio(_one(knn, provider="torch matmul+topk"), ours), 3.0, True)
    add("knn_search: time over the bare matmul", _ratio(ours, _one(knn, provider="matmul only")), 2.0, False)

    ma = results.get("memory_attention", [])
    for pss in ("fwd", "fwd+bwd"):
        add(f"memory_attention {pss}: speedup vs torch gather+softmax",
            _ratio(_one(ma, provider="torch-gather", **{"pass": pss}), _one(ma, provider="fused", **{"pass": pss})),
            3.0, True)

    ti = results.get("titans", [])
    mine = next((r for r in ti if r.get("memory") == "mlp" and str(r.get("provider", "")).startswith("memlayers")), None)
    peer = _one(ti, memory="mlp", provider="titans-pytorch")
    add("Titans MLP fwd+bwd 8K tokens: tokens/s vs titans-pytorch", _ratio(mine, peer, "tokens_per_s"), 10.0, True,
        _status(peer))
    add("Titans MLP fwd+bwd 8K tokens: peak memory over titans-pytorch's",
        _ratio(mine, peer, "peak_MB"), 1.0, False, _status(peer))
    fla = _one(ti, provider="fla-gated-delta", mode="fwd+bwd") or _one(ti, provider="fla-gated-delta")
    add("Titans linear fwd+bwd: time over fla chunk_gated_delta_rule",
        _ratio(_one(ti, provider="memlayers-triton-op", mode="fwd+bwd"), fla), 2.0, False, _status(fla))

    dk = results.get("dkvb", [])
    pip = _one(dk, provider="pip dkvb", **{"pass": "fwd+bwd"}) or _one(dk, provider="pip dkvb")
    ours_dk = _one(dk, provider="ours triton", **{"pass": "fwd+bwd"}) or _one(dk, provider="ours naive",
                                                                              **{"pass": "fwd+bwd"})
    add("DKVB fwd+bwd: speedup vs discrete-key-value-bottleneck-pytorch", _ratio(pip, ours_dk), 5.0, True,
        _status(pip))
    add("DKVB fwd+bwd: peak memory, pip's over ours", _ratio(pip, ours_dk, "peak_mb"), 10.0, True, _status(pip))

    pk = results.get("pkm", [])
    fwd = _one(pk, provider="ours", **{"pass": "fwd"})
    add("PKM gather fwd: fraction of HBM bandwidth", fwd.get("bw_fraction") if fwd else None, 0.6, True,
        None if not fwd or fwd.get("bw_fraction") is not None else "no device peak known (not a GPU)")
    bwd = _one(pk, provider="ours", **{"pass": "bwd"})
    add("PKM gather bwd: speedup vs F.embedding_bag", bwd.get("speedup_vs_ref") if bwd else None, 3.0, True)

    hf = results.get("hf", [])
    mem = max((r for r in hf if r.get("memory_tokens")), key=lambda r: r["memory_tokens"], default=None)
    add(f"HF decode with {mem['memory_tokens'] if mem else '256K'}-token memory: tokens/s vs no memory",
        mem.get("decode_vs_base") if mem else None, 0.7, True)
    return out


# ------------------------------------------------------------------------------------------ running

def _write(path: Path, payload) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def _run_step(name: str, tiny: bool, path: str) -> None:
    """Child process: run the step's stages, rewriting its JSON after each."""
    from common import machine_info

    payload = {"machine": machine_info(), "step": name, "tiny": tiny, "complete": False, "rows": []}
    for stage in STEPS[name](tiny):
        try:
            payload["rows"] += stage()
        except Exception:  # one failed stage must not lose the others' rows
            payload.setdefault("errors", []).append(traceback.format_exc(limit=5))
        _write(Path(path), payload)
    payload["complete"] = not payload.get("errors")
    _write(Path(path), payload)


def run_step(name: str, tiny: bool, path: Path, budget: float) -> dict:
    proc = mp.get_context("fork").Process(target=_run_step, args=(name, tiny, str(path)), daemon=True)
    start = time.monotonic()
    proc.start()
    proc.join(budget)
    timed_out = proc.is_alive()
    if timed_out:
        proc.kill()
        proc.join()
    payload = json.loads(path.read_text()) if path.exists() else {"rows": []}
    payload["seconds"] = round(time.monotonic() - start, 1)
    if timed_out:
        payload["note"] = f"cut off at its {budget:.0f} s budget; rows so far kept"
    elif proc.exitcode != 0:
        payload["note"] = f"exited with code {proc.exitcode}"
    _write(path, payload)
    return payload


def run_gpu_tests(budget: float, path: Path, tiny: bool, tests: str) -> dict:
    """``pytest -m gpu tests``; in a dry run only collection (the gpu tests need a GPU)."""
    cmd = [sys.executable, "-m", "pytest", tests, "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    if tiny:
        cmd.append("--collect-only")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|selected|"
                                                r"tests? collected)", out)}
    payload = {"step": "gpu-tests", "returncode": code, "counts": counts, "seconds": round(time.monotonic() - start, 1),
               "tail": out[-3000:], "note": "" if code is not None else f"cut off at its {budget:.0f} s budget"}
    _write(path, payload)
    return payload


def format_targets(lines: List[dict]) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    rows = [[ln["target"], cell(ln["measured"]), ln["bar"], {True: "yes", False: "NO", None: "-"}[ln["met"]],
             ln["note"]] for ln in lines]
    head = ["target (issue 13)", "measured", "bar", "met", "note"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, the same code paths; no GPU needed")
    ap.add_argument("--results", default=str(HERE / "results"), help="where the JSON files go")
    ap.add_argument("--steps", default=",".join(["gpu-tests", *STEPS]), help="comma-separated subset")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S)
    ap.add_argument("--tests", default="tests", help="what the gpu-tests step runs pytest on")
    args = ap.parse_args(argv)

    import torch
    import common  # noqa: F401  (imported once here, inherited by every step's forked process)
    import memlayers  # noqa: F401

    tiny = args.dry_run
    if not tiny and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (use --dry-run to exercise it on CPU)", file=sys.stderr)
        return 2
    tag = "dryrun" if tiny else "gpu"
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: Dict[str, List[dict]] = {}
    steps = {}
    for name in args.steps.split(","):
        left = args.deadline - (time.monotonic() - start)
        if left < 5:
            steps[name] = {"note": "skipped: the overall deadline was reached"}
            continue
        budget = min(BUDGETS_S[name], left)
        path = results_dir / f"{name}-{tag}.json"
        print(f"[{time.monotonic() - start:6.1f} s] {name} (budget {budget:.0f} s)", flush=True)
        if name == "gpu-tests":
            steps[name] = run_gpu_tests(budget, path, tiny, args.tests)
        else:
            payload = run_step(name, tiny, path, budget)
            results[name] = payload.get("rows", [])
            steps[name] = {k: payload.get(k) for k in ("seconds", "complete", "note", "errors")}
            if payload.get("errors"):  # the last line of each traceback says what broke
                steps[name]["note"] = "; ".join(e.strip().splitlines()[-1] for e in payload["errors"])
    lines = targets(results)
    summary = {"tag": tag, "seconds": round(time.monotonic() - start, 1), "steps": steps, "targets": lines}
    _write(results_dir / f"gpu-check-{tag}.json", summary)
    print()
    for name, s in steps.items():
        extra = s.get("counts") or ""
        print(f"{name:<18} {s.get('seconds', '-')!s:>6} s  {s.get('note') or ''} {extra}".rstrip())
    print()
    if tiny:
        print("DRY RUN: CPU at tiny sizes; the numbers exercise the code paths and say nothing about the targets")
    print(format_targets(lines))
    print(f"\ntotal {summary['seconds']} s; results in {results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
