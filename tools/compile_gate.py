"""Compile every Triton kernel of memlayers for real GPUs, without one, and report its resources.

    python tools/compile_gate.py --set gate --targets 90,80 --json report.json
    PYTHONPATH=.triton36 python tools/compile_gate.py ...     # the GPU image's Triton (3.6)

For each case of ``tools/kernel_cases.py`` the op's Triton entry point runs on ``meta`` tensors with
the interpreter off, and ``JITFunction.run`` only records what the host code launches (arguments,
constexprs, warps, stages): the specializations are the host's own choices. Each distinct launch is
bound exactly as triton's launcher binds it (its binder and argument packing), compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and measured: shared memory from
the compiled metadata, registers, stack frame and spills from the bundled ptxas's ``-v`` log.

Results are cached as JSON under ``--cache`` (default ``tests/compile/cache``, committed), keyed by the kernel's
source hash (its own and every jit function it calls), the specialization, the compile options, the
triton version and the target, so an unchanged kernel is never compiled twice.
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: kernels must be real JITFunctions
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints the ptxas -v log it already asks for

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

# Nothing compiled here may land in the user's triton cache: every compile runs ptxas (for its log).
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-gate-triton-")
warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from kernel_cases import DRIVERS, KERNEL_FOLDERS, Case, cases  # noqa: E402

# Shared memory one block may use (the opt-in maximum, bytes): CUDA programming guide, compute capabilities.
SMEM_LIMIT = {90: 232448, 80: 166912}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------- recording

class Launch:
    """One kernel launch as the host made it."""

    def __init__(self, kernel, args, kwargs):
        self.kernel, self.args, self.kwargs = kernel, args, kwargs

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


@contextlib.contextmanager
def recording(into: list):
    """Every ``kernel[grid](...)`` inside appends a Launch instead of running."""
    original = triton_jit.JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        into.append(Launch(self, args, kwargs))

    triton_jit.JITFunction.run = record
    try:
        yield
    finally:
        triton_jit.JITFunction.run = original


def load_op(name: str):
    return importlib.import_module(f"memlayers.ops.{name}.triton")


def record_case(case: Case):
    """The launches of one case (for "bwd" cases, only the backward's kernels)."""
    launches: list = []
    with recording(launches):
        DRIVERS[case.op](case, torch, TORCH_DTYPES[case.dtype], load_op)
    if case.pas == "bwd":
        launches = [x for x in launches if "_bwd" in x.name]
    return launches


def all_kernels():
    """``module:name`` of every ``@triton.jit`` kernel (a name ending in ``_kernel``) of the gated op folders."""
    found = set()
    for op in KERNEL_FOLDERS:
        for path in sorted((ROOT / "memlayers" / "ops" / op).glob("triton*.py")):
            mod = importlib.import_module(f"memlayers.ops.{op}.{path.stem}")
            for name, obj in vars(mod).items():
                if isinstance(obj, triton_jit.JITFunction) and name.endswith("_kernel") and obj.fn.__module__ == mod.__name__:
                    found.add(f"{obj.fn.__module__}:{name}")
    return sorted(found)


# ------------------------------------------------------------------------------------------- compiling

def bind(launch: Launch, target):
    """(ASTSource, options) exactly as ``JITFunction.run`` builds them for these arguments."""
    kernel = launch.kernel
    backend = make_backend(target)
    binder = triton_jit.create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options, backend, constexprs


def cache_key(src, options, backend, target) -> str:
    parts = [triton.__version__, src.hash(), backend.hash(), options.hash(), repr(target)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    props = _PTXAS_PROPS.search(log)
    regs = _PTXAS_REGS.search(log)
    if not (props and regs):
        raise RuntimeError(f"no resource report in the ptxas log:\n{log}")
    stack, spill_st, spill_ld = (int(x) for x in props.groups())
    return {"regs": int(regs.group(1)), "stack": stack, "spill_stores": spill_st, "spill_loads": spill_ld}


def compile_one(src, options, target) -> dict:
    """Compile; the resource report, or the error."""
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # the gate reports compile errors, it does not stop at them
        return {"error": f"{type(exc).__name__}: {exc}"[:4000], "compile_s": round(time.perf_counter() - start, 2)}
    row = {"shared": int(compiled.metadata.shared), "compile_s": round(time.perf_counter() - start, 2)}
    row.update(parse_ptxas(log.getvalue()))
    return row


# The pending jobs of a parallel run, read by the forked workers by index. A job cannot travel to a
# worker by pickle: its ASTSource holds the JITFunction, whose ``fn`` pickles by reference to a module
# attribute that is the JITFunction itself, not the function (PicklingError). Forked workers inherit
# this list, so only an index crosses the process boundary.
_JOBS: list = []


def _compile_job(job):
    key, src, options, target, path = job
    row = compile_one(src, options, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(row))
    tmp.replace(path)
    return key, row


def _compile_job_at(i: int):
    return _compile_job(_JOBS[i])


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


def run_gate(case_list, archs, cache_dir: Path, jobs: int, log=print, cached_only: bool = False):
    """Record every case, compile every distinct launch for every target; -> report dict.

    ``cached_only``: compile nothing, report only what the cache holds (a quick look at a running sweep)."""
    version = triton.__version__
    rows, pending, seen = [], {}, {}
    for case in case_list:
        for launch in record_case(case):
            for arch in (a for a in archs if a in case.archs):
                target = GPUTarget("cuda", arch, 32)
                src, options, backend, constexprs = bind(launch, target)
                key = cache_key(src, options, backend, target)
                path = cache_dir / version / f"sm{arch}" / f"{key}.json"
                rows.append({
                    "case": case.id, "op": case.op, "pass": case.pas, "dtype": case.dtype, "d": case.d,
                    "kernel": launch.name, "arch": arch, "triton": version, "key": key,
                    "num_warps": options.num_warps, "num_stages": options.num_stages,
                    "constexprs": {launch.kernel.arg_names[p[0]]: _jsonable(v) for p, v in constexprs.items()},
                })
                if key not in seen and not path.exists():
                    pending[key] = (key, src, options, target, path)
                seen[key] = path
    log(f"triton {version}: {len(rows)} launches x targets, {len(seen)} distinct, {len(pending)} to compile")
    start = time.perf_counter()
    if cached_only:
        rows = [r for r in rows if seen[r["key"]].exists()]
        pending = {}
    if pending:
        if jobs > 1:
            import multiprocessing
            _JOBS[:] = pending.values()
            try:
                with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
                    for i, (key, row) in enumerate(pool.map(_compile_job_at, range(len(_JOBS))), 1):
                        log(f"  [{i}/{len(pending)}] {key[:12]} {row.get('compile_s')} s")
            finally:
                _JOBS.clear()
        else:
            for i, job in enumerate(pending.values(), 1):
                _, row = _compile_job(job)
                log(f"  [{i}/{len(pending)}] {job[0][:12]} {row.get('compile_s')} s")
    for row in rows:
        result = json.loads(seen[row["key"]].read_text())
        row.update(result)
        row["cached"] = row["key"] not in pending
        if "shared" in row:
            row["smem_limit"] = SMEM_LIMIT.get(row["arch"])
    return {"triton": version, "torch": torch.__version__, "archs": list(archs), "kernels": all_kernels(),
            "compile_s": round(time.perf_counter() - start, 1), "rows": rows}


def table(report) -> str:
    """One line per (case, kernel, target): shared bytes, registers, stack frame and spill bytes."""
    head = f"{'case':<58} {'kernel':<38} {'sm':>3} {'warps':>5} {'shared':>7} {'regs':>4} {'stack':>6} {'spill':>6}"
    lines = [f"triton {report['triton']}", head]
    for r in report["rows"]:
        if "error" in r:
            stats = "ERROR " + r["error"].splitlines()[0][:60]
        else:
            over = "!" if r["shared"] > r["smem_limit"] else " "
            stats = f"{r['shared']:>6}{over} {r['regs']:>4} {r['stack']:>6} {r['spill_stores']:>6}"
        lines.append(f"{r['case']:<58} {r['kernel']:<38} {r['arch']:>3} {r['num_warps']:>5} {stats}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="gate", choices=("gate", "sweep"))
    ap.add_argument("--case", action="append", help="only these case ids (repeatable)")
    ap.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated")
    ap.add_argument("--cache", default=str(ROOT / "tests" / "compile" / "cache"))
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--quiet", action="store_true", help="no table")
    ap.add_argument("--cached-only", action="store_true", help="compile nothing; report what the cache holds")
    args = ap.parse_args(argv)
    chosen = cases(args.set)
    if args.case:
        chosen = [c for c in chosen if c.id in set(args.case)]
    archs = [int(a) for a in args.targets.split(",")]
    report = run_gate(chosen, archs, Path(args.cache), args.jobs, log=lambda m: print(m, file=sys.stderr, flush=True),
                      cached_only=args.cached_only)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not args.quiet:
        print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
