"""Sharded kNN search: one ``KNNMemory`` against the same memory sharded over 2 gloo CPU processes.

    python bench/bench_distributed.py [--quick]     # table; writes bench/results/distributed-cpu.json

A decode step (T = 1 query per head) searches a full memory of ``capacity`` tokens (global). Rows:

- ``ranks=1``: the unsharded ``KNNMemory.search`` with 1 intra-op thread (the per-rank baseline);
- ``ranks=2``: ``KNNMemory(..., process_group=...)`` over two processes of 1 thread each (the same two
  cores), timed on every rank after a barrier, every rank the same fixed number of calls (collectives
  must pair up). In each repetition three things are timed in turn: the sharded ``search``
  (``ms``), the rank's exact search over its own stripe alone (``local_ms``), and the search's
  communication alone (``comm_ms``: the all-gather merge of scores and slot ids, then the
  all-reduces that fetch the winners' positions, keys and values, on tensors of the step's shapes).

Every figure is measured on the machine named in the JSON (medians over ``REPS`` calls, 20/80%
quantiles); ``load_avg_1m`` says how busy that shared machine was.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import format_table, write_results  # noqa: E402

import memlayers as ml  # noqa: E402
from memlayers.memory.sharding import fetch_winners, merge_topk  # noqa: E402
from memlayers.ops.knn_search import knn_search  # noqa: E402

REPS, WARMUP = 30, 3
B, H, D, K = 1, 1, 128, 32
COLUMNS = ["capacity", "ranks", "threads", "ms", "ms_p20", "ms_p80", "local_ms", "comm_ms", "bytes_per_rank",
           "load_avg_1m"]


def _stats(times):
    q = statistics.quantiles(times, n=10)
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def _timed(fns, group=None):
    """Medians of each of ``fns``, run in turn in every repetition (so a busy spell hits them alike)."""
    for _ in range(WARMUP):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(REPS):
        for fn, out in zip(fns, times):
            if group is not None:
                dist.barrier(group)
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1000.0)
    return [_stats(t) for t in times]


def _fill(mem, capacity, seed):
    g = torch.Generator().manual_seed(seed)  # the same tokens on every rank: they make the same calls
    for start in range(0, capacity, 65_536):
        n = min(65_536, capacity - start)
        mem.add(torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g))
    return torch.randn(B, H, 1, D, generator=g)


def _unsharded(capacity, threads):
    torch.set_num_threads(threads)
    mem = ml.KNNMemory(B, H, D, capacity=capacity, backend="torch")
    q = _fill(mem, capacity, 0)
    row, = _timed([lambda: mem.search(q, K)])
    return {"capacity": capacity, "ranks": 1, "threads": threads, **row, "local_ms": row["ms"], "comm_ms": 0.0,
            "bytes_per_rank": mem.nbytes()}


def _rank(rank, world, init_file, capacity, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        group = dist.group.WORLD
        mem = ml.KNNMemory(B, H, D, capacity=capacity, backend="torch", process_group=group)
        q = _fill(mem, capacity, 0)
        filled = mem._stripe.local_filled(mem.filled)
        g = torch.Generator().manual_seed(1)  # the same winners on every rank, as after a real merge
        scores, ids = torch.randn(B, H, 1, K, generator=g), torch.randint(0, capacity, (B, H, 1, K), generator=g)
        # One byte row per winner, as the store sends it: position (int64) and fp32 key and value.
        rows = torch.zeros(B * H * K, 8 + 2 * D * 4, dtype=torch.uint8)
        owner = (ids % world).reshape(-1)

        def comm():
            merge_topk(scores, ids, K, group)
            fetch_winners(rows, owner, group)

        total, local, only_comm = _timed([lambda: mem.search(q, K),
                                          lambda: knn_search(q, mem.keys[:, :, :filled], K, backend="torch"), comm],
                                         group)
        out[rank] = {"capacity": capacity, "ranks": world, "threads": 1, **total, "local_ms": local["ms"],
                     "comm_ms": only_comm["ms"], "bytes_per_rank": mem.nbytes()}
    finally:
        dist.destroy_process_group()


def _sharded(capacity, world=2):
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(world, os.path.join(tmp, "init"), capacity, out), nprocs=world, join=True)
        rows = [out[r] for r in range(world)]
    slowest = max(rows, key=lambda r: r["ms"])  # a step ends when the slowest rank has merged
    return {**slowest, "rank_ms": [r["ms"] for r in rows]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small capacity only")
    args = parser.parse_args(argv)
    capacities = [65_536] if args.quick else [65_536, 262_144, 1_048_576]
    rows = []
    for capacity in capacities:
        rows += [_unsharded(capacity, 1), _sharded(capacity)]
        rows[-2]["load_avg_1m"] = rows[-1]["load_avg_1m"] = os.getloadavg()[0]  # a shared machine: say how busy
        print(format_table(rows[-2:], COLUMNS), flush=True)
    path = write_results("distributed", [{**r, "B": B, "H": H, "D": D, "k": K, "T": 1, "dtype": "float32"}
                                         for r in rows])
    print(format_table(rows, COLUMNS))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
