"""Soak: every op called many times (forward and backward) keeps memory use and the number of live
Python objects flat, so repeated decode steps or training steps do not leak. (The store's own soak,
add/search/reset cycles on KNNMemory, lives in tests/memory.)"""
import gc
import os

import pytest
import torch

from fuzz_helpers import backends, device
from memlayers.ops import (dkvb_lookup, knn_search, local_attention, memory_attention, merge_attention, titans_memory,
                           weighted_embedding_bag)

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc (Linux)")

MiB = 1 << 20
# Each torch call allocates about 1 MiB that it must give back: a leak of it per call adds 16+ MiB
# over the soak, past the allowance for allocator noise. Live Python objects (tensors kept in a
# list, saved contexts) are counted exactly: after warm-up their number does not move (measured),
# so fewer new objects than calls is required, which catches a leak of one object per call.
RSS_ALLOWANCE = 8 * MiB


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Sizes per backend: the torch paths at decode/training-step sizes, the Triton interpreter (about
# 0.3 s a call on the 2-core VM even at these sizes) at tiny ones.
SIZES = {
    "torch": dict(T=8, M=2048, C=256, k=32, S=24, V=4096, bags=128, B=32, N=128, TT=16, D=64, DT=16),
    "triton": dict(T=4, M=64, C=32, k=4, S=8, V=64, bags=8, B=8, N=16, TT=16, D=16, DT=8),
}
ROUNDS = {"torch": (3, 16), "triton": (1, 2)}   # (warm-up calls, measured calls)


def make_calls(backend):
    z = SIZES[backend]
    T, D, DT = z["T"], z["D"], z["DT"]
    dev = device()
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev)
    q, keys = r(1, 4, T, D), r(1, 2, z["M"], D)
    mk, mv = r(1, 2, z["C"], D).requires_grad_(), r(1, 2, z["C"], D).requires_grad_()
    idx = torch.randint(-1, z["C"], (1, 4, T, z["k"]), generator=g).to(dev)
    lq, lk, lv = r(1, 4, T, D).requires_grad_(), r(1, 2, z["S"], D).requires_grad_(), r(1, 2, z["S"], D).requires_grad_()
    table, bag_w = r(z["V"], D).requires_grad_(), r(z["bags"], 8)
    bag_idx = torch.randint(0, z["V"], (z["bags"], 8), generator=g).to(dev)
    dq, dkeys, dvals = r(z["B"], 4, 16), r(4, z["N"], 16), r(4, z["N"], 32).requires_grad_()
    tq, tk, tv = r(1, 2, z["TT"], DT), r(1, 2, z["TT"], DT), r(1, 2, z["TT"], DT)
    theta, W0 = torch.full((1, 2, z["TT"]), 0.05, device=dev), r(1, 2, DT, DT).requires_grad_()

    def attention():
        out_m, lse_m = memory_attention(lq, mk, mv, idx, backend=backend)
        out_l, lse_l = local_attention(lq, lk, lv, backend=backend)
        out, lse = merge_attention(out_l, lse_l, out_m, lse_m)
        (out.sum() + lse.sum()).backward()

    return {
        "knn_search": lambda: knn_search(q, keys, z["k"], backend=backend),
        "attention (memory + local + merge)": attention,
        "weighted_embedding_bag": lambda: weighted_embedding_bag(table, bag_idx, bag_w, backend=backend).sum().backward(),
        "dkvb_lookup": lambda: dkvb_lookup(dq, dkeys, dvals, 2, backend=backend)[0].sum().backward(),
        "titans_memory": lambda: titans_memory(tq, tk, tv, theta, (W0,), chunk_size=16,
                                               backend=backend)[0].sum().backward(),
    }


@pytest.mark.parametrize("backend", backends())
def test_repeated_calls_do_not_grow_memory(backend):
    warmup, rounds = ROUNDS[backend]
    calls = make_calls(backend)
    if backend == "triton":  # H4's Titans kernels have their own tests; the op's torch path is soaked
        calls.pop("titans_memory")
    for name, call in calls.items():
        for _ in range(warmup):
            call()
        gc.collect()
        rss0, objects0 = rss(), len(gc.get_objects())
        for _ in range(rounds):
            call()
        gc.collect()
        grown, new_objects = rss() - rss0, len(gc.get_objects()) - objects0
        assert grown < RSS_ALLOWANCE, f"{name} ({backend}): RSS grew {grown / MiB:.1f} MiB over {rounds} calls"
        assert new_objects < rounds, f"{name} ({backend}): {new_objects} more live objects after {rounds} calls"
