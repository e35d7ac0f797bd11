"""The ``memlayers`` command line: ``memlayers demo``, ``memlayers bench``, ``memlayers probe ...``."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import List, Optional


def _bench_runner() -> Path:
    # bench/ is not a package (docs/design.md, Layout): it lives beside memlayers/ in a source checkout.
    return Path(__file__).resolve().parent.parent / "bench" / "run.py"


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main()


def _cmd_bench(args: argparse.Namespace) -> int:
    runner = _bench_runner()
    if not runner.exists():
        print("memlayers bench: bench/run.py not found; run it from a source checkout of memlayers", file=sys.stderr)
        return 2
    cmd = [sys.executable, str(runner), "--op", args.op]
    if args.quick:
        cmd.append("--quick")
    if args.no_save:
        cmd.append("--no-save")
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    from .probes.cli import add_probe_parser, run_probe

    parser = argparse.ArgumentParser(prog="memlayers",
                                     description="Memory layers for PyTorch: demo, benchmarks, recall probes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_probe_parser(sub)
    sub.choices["probe"].set_defaults(func=run_probe)

    demo = sub.add_parser("demo", help="run the demo: a kNN memory streamed, searched, backends compared")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run kernel microbenchmarks (from a source checkout)")
    bench.add_argument("--op", default="all", help="operator family (file bench/bench_<op>.py) or 'all' (default)")
    bench.add_argument("--quick", action="store_true", help="smallest shapes only")
    bench.add_argument("--no-save", action="store_true", help="print only; do not write bench/results/")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
