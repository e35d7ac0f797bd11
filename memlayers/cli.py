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


def _depths(text: str) -> List[float]:
    try:
        depths = [float(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"depths must be comma-separated fractions, got {text!r}") from None
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must lie in [0, 1], got {text!r}")
    return depths


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEFAULT_PARTS, PARTS, main as demo_main

    parts = {None: DEFAULT_PARTS, "all": PARTS}.get(args.part, (args.part,))
    if args.doc_tokens < 2 * args.window:
        print(f"memlayers demo: --doc-tokens must be at least twice --window ({2 * args.window})", file=sys.stderr)
        return 2
    return demo_main(parts, model=args.model, doc_tokens=args.doc_tokens, window=args.window, depths=args.depths,
                     new_tokens=args.new_tokens)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


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

    demo = sub.add_parser("demo", help="run the demo: a pretrained model with kNN memory against its window alone, "
                                       "then the tiny-model exactness check")
    demo.add_argument("--part", choices=("real", "tiny", "store", "all"), default=None,
                      help="one part: real (the pretrained model, needles and costs), tiny (exactness check), "
                           "store (search backends compared), all; default: real then tiny")
    demo.add_argument("--model", default="smollm2",
                      help="the real part's model: smollm2 (embedded), a .gguf file or a HuggingFace folder")
    demo.add_argument("--doc-tokens", type=_positive, default=2048, help="document length in tokens (default 2048)")
    demo.add_argument("--window", type=_positive, default=256,
                      help="local window: tokens the model reads directly; also the memorize chunk (default 256)")
    demo.add_argument("--depths", type=_depths, default=None,
                      help="needle depths, comma-separated fractions (default 0.1,0.4,0.7)")
    demo.add_argument("--new-tokens", type=_positive, default=8, help="tokens generated per answer (default 8)")
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
