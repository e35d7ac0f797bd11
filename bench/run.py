"""Plain benchmark tables: ``python bench/run.py --op knn_search`` (or ``--op all``).

Each operator family is a module ``bench/bench_<op>.py`` exposing ``table(quick: bool) -> (rows, columns)``;
the rows are printed and written to ``bench/results/<op>-<cpu|gpu>.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import format_table, machine_info, write_results  # noqa: E402


def available_ops():
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def load(op: str):
    path = HERE / f"bench_{op}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{op}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    ops = available_ops()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="all", help=f"one of {ops} or 'all'")
    parser.add_argument("--quick", action="store_true", help="smallest shapes only (a smoke run)")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/")
    args = parser.parse_args(argv)
    chosen = ops if args.op == "all" else [args.op]
    unknown = [o for o in chosen if o not in ops]
    if unknown:
        parser.error(f"unknown --op {unknown[0]!r}; choose from {ops} or 'all'")
    info = machine_info()
    print(f"device: {info['device']}  torch {info['torch']}  triton {info['triton']}  commit {info['commit']}")
    for op in chosen:
        rows, columns = load(op).table(quick=args.quick)
        print(f"\n== {op}\n" + format_table(rows, columns))
        if not args.no_save:
            print(f"wrote {write_results(op, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
