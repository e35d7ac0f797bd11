"""The shapes the compile gate drives every Triton kernel of memlayers with.

A case names an operator, a pass (``fwd``: the forward launches; ``bwd``: the backward launches of a
forward + backward), a dtype, a head dim and the op's own knobs. It holds no tile sizes, warps or other
specialization: ``tools/compile_gate.py`` calls the op's Triton entry point on ``meta`` tensors with
the interpreter off and records what its host code launches, so the gate always compiles the host's
current choices.

Two sets: ``gate_cases()`` (``make test``: one representative per host branch, see each op's notes)
and ``sweep_cases()`` (``make compile-sweep``: the supported range, every combination).

Importing this module needs neither torch nor triton (the tests parametrize over it).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

DTYPES = ("fp32", "bf16", "fp16")
HEAD_DIMS = (16, 32, 64, 80, 128, 256)  # the supported range 16..256: every power-of-two tile, one padded
# knn_search accepts any k; its kernel takes k up to knn_search.triton.MAX_KERNEL_K (256), larger k runs
# the torch path (no kernel launch): the range covers the kernel's largest k.
KNN_KS = (1, 16, 32, 100, 256)
# Titans: the MLP hidden size goes up to 4x the head dim (issue 13); chunk sizes are powers of two >= 16.
TITANS_CHUNKS = (16, 64)


@dataclass(frozen=True)
class Case:
    op: str
    pas: str  # "fwd" or "bwd"
    dtype: str
    d: int
    opts: Tuple[Tuple[str, object], ...] = field(default=())
    archs: Tuple[int, ...] = (90, 80)  # the targets it is compiled for (not part of its id)

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}={_fmt(v)}" for k, v in self.opts)
        return f"{self.op}-{self.pas}-{self.dtype}-d{self.d}{extra}"

    def opt(self, name: str, default=None):
        return dict(self.opts).get(name, default)


def _fmt(v) -> str:
    return {True: "1", False: "0"}.get(v, str(v)) if isinstance(v, bool) else str(v)


def _case(op, pas, dtype, d, archs=(90, 80), **opts) -> Case:
    return Case(op, pas, dtype, d, tuple(sorted(opts.items())), archs)


# ------------------------------------------------------------------------------------- the make-test set
# One representative per branch of each host's choices, picked so that a cold run fits the suite's
# budget: fp32 (ieee dots: the slow-to-compile, spilling path) and bf16 (tensor cores) for every kernel;
# the head-dim branches where a host switches tiles or warps (<= 64, 128, 256); every constexpr feature
# flag; the largest k. fp16 is the bf16 code with another operand type: it is in the sweep.
# The Titans cases at real head dims are compiled for sm_90 only (the sweep compiles both): sm_90's
# shared-memory limit is the one they approach (cold compile times: docs/gpu.md).

def gate_cases() -> List[Case]:
    return [
        _case("knn_search", "fwd", "bf16", 128, k=32, metric="ip"),
        _case("knn_search", "fwd", "fp32", 64, k=16, metric="cosine"),
        _case("knn_search", "fwd", "bf16", 256, k=256, metric="l2", T=1),
        _case("memory_attention", "fwd", "bf16", 128, k=32, rotary=True),
        _case("memory_attention", "bwd", "bf16", 128, k=32, rotary=True, mem_grad=True),
        _case("memory_attention", "fwd", "fp32", 64, k=8, rotary=False),
        _case("memory_attention", "bwd", "fp32", 64, k=8, rotary=False, mem_grad=False),
        _case("local_attention", "fwd", "bf16", 128, prefix=True),
        _case("local_attention", "bwd", "bf16", 128, prefix=True),
        _case("local_attention", "fwd", "fp32", 64, prefix=False),
        _case("local_attention", "bwd", "fp32", 64, prefix=False),
        _case("local_attention", "fwd", "bf16", 256, prefix=False),
        _case("local_attention", "bwd", "bf16", 256, prefix=False),
        _case("dkvb", "fwd", "fp32", 64, topk=8, mask=True),
        _case("dkvb", "fwd", "bf16", 256, topk=1, mask=False),
        _case("dkvb", "bwd", "bf16", 64, topk=4, deterministic=True),
        _case("dkvb", "bwd", "fp32", 64, topk=4, deterministic=False),
        _case("embedding_bag", "fwd", "bf16", 512),
        _case("embedding_bag", "bwd", "bf16", 512),
        _case("embedding_bag", "bwd", "fp32", 64),
        _case("titans", "fwd", "bf16", 16, depth=1, chunk=16),
        _case("titans", "bwd", "bf16", 16, depth=1, chunk=16),
        _case("titans", "fwd", "bf16", 16, depth=2, hidden=4, chunk=16, bias="huber", momentum=False),
        _case("titans", "bwd", "bf16", 16, depth=2, hidden=4, chunk=16, bias="lp", forget=False),
        _case("titans", "fwd", "bf16", 128, depth=1, chunk=64, archs=(90,)),
        _case("titans", "bwd", "bf16", 128, depth=1, chunk=64, archs=(90,)),
        _case("titans", "bwd", "bf16", 64, depth=1, chunk=64, archs=(90,)),  # value blocks of 64 columns
        _case("titans", "fwd", "bf16", 64, depth=2, hidden=4, chunk=64, archs=(90,)),
        _case("titans", "bwd", "bf16", 64, depth=2, hidden=4, chunk=64, archs=(90,)),
        # The MLP memory at head dim 128 (issue 13: no spills there), both targets: sm_80's mma operands
        # live in registers, where whole-head tiles spilled before the head dim was split into blocks.
        _case("titans", "fwd", "bf16", 128, depth=2, hidden=4, chunk=64),
        _case("titans", "bwd", "bf16", 128, depth=2, hidden=4, chunk=64),
        # 16-token chunks at head dim 128 (sm_90): 16-row dots take mma, not wgmma, and each warp holds a
        # dot's whole row operand, so the head-dim blocks there are 16 wide (issue 13: no spills).
        _case("titans", "fwd", "bf16", 128, depth=2, hidden=4, chunk=16, archs=(90,)),
        _case("titans", "bwd", "bf16", 128, depth=2, hidden=4, chunk=16, archs=(90,)),
        # Head dim 256, the top of the supported range: the linear memory with 64-token chunks, the MLP
        # memory with the largest chunks its host runs there (MLP_WIDE_MAX_CHUNK, 32).
        _case("titans", "fwd", "bf16", 256, depth=1, chunk=64, archs=(90,)),
        _case("titans", "bwd", "bf16", 256, depth=1, chunk=64, archs=(90,)),
        _case("titans", "fwd", "bf16", 256, depth=2, hidden=4, chunk=32, archs=(90,)),
        _case("titans", "bwd", "bf16", 256, depth=2, hidden=4, chunk=32, archs=(90,)),
    ]


# ------------------------------------------------------------------------------------ the exhaustive sweep

def sweep_cases() -> List[Case]:
    c: List[Case] = []
    for dtype, d in itertools.product(DTYPES, HEAD_DIMS):
        for k, metric in itertools.product(KNN_KS, ("ip", "cosine", "l2")):
            c.append(_case("knn_search", "fwd", dtype, d, k=k, metric=metric))
        c.append(_case("knn_search", "fwd", dtype, d, k=32, metric="ip", T=1))
        for k, rotary in itertools.product((1, 8, 32, 64), (False, True)):
            c.append(_case("memory_attention", "fwd", dtype, d, k=k, rotary=rotary))
            for mem_grad in (False, True):
                c.append(_case("memory_attention", "bwd", dtype, d, k=k, rotary=rotary, mem_grad=mem_grad))
        for pas, prefix in itertools.product(("fwd", "bwd"), (False, True)):
            c.append(_case("local_attention", pas, dtype, d, prefix=prefix))
        for topk, mask in itertools.product((1, 4, 8), (False, True)):
            c.append(_case("dkvb", "fwd", dtype, d, topk=topk, mask=mask))
        for deterministic in (False, True):
            c.append(_case("dkvb", "bwd", dtype, d, topk=4, deterministic=deterministic))
        for pas in ("fwd", "bwd"):
            c.append(_case("embedding_bag", pas, dtype, d))
            c.append(_case("embedding_bag", pas, dtype, 4 * d))
        for pas, chunk, momentum, forget in itertools.product(("fwd", "bwd"), TITANS_CHUNKS, (False, True),
                                                              (False, True)):
            c.append(_case("titans", pas, dtype, d, depth=1, chunk=chunk, momentum=momentum, forget=forget))
            for hidden in (1, 4):
                c.append(_case("titans", pas, dtype, d, depth=2, hidden=hidden, chunk=chunk, momentum=momentum,
                               forget=forget))
        for bias in ("lp", "huber"):
            c.append(_case("titans", "bwd", dtype, d, depth=2, chunk=64, bias=bias))
    return c


CASE_SETS = {"gate": gate_cases, "sweep": sweep_cases}


# ------------------------------------------------------------------------------------------- the drivers
# Each driver builds meta tensors of realistic sizes (free: meta tensors hold no data) and calls the op's
# Triton entry point, then backward for "bwd". Sizes matter only where the host reads them: knn_search's
# row block (T), memory_attention's query block (T, k).

def _drive_knn_search(case: Case, torch, dt, load):
    mod = load("knn_search")
    T = case.opt("T", 4096)
    q = torch.empty(1, 8, T, case.d, dtype=dt, device="meta")
    keys = torch.empty(1, 8, 256 * 1024, case.d, dtype=dt, device="meta")
    mod.knn_search_triton(q, keys, case.opt("k"), None, case.opt("metric"))


def _drive_memory_attention(case: Case, torch, dt, load):
    mod = load("memory_attention")
    B, Hq, Hkv, T, C, k, d = 1, 8, 2, 1024, 65536, case.opt("k"), case.d
    bwd = case.pas == "bwd"
    mem_grad = bwd and case.opt("mem_grad", False)
    q = torch.empty(B, Hq, T, d, dtype=dt, device="meta", requires_grad=bwd)
    mk = torch.empty(B, Hkv, C, d, dtype=dt, device="meta", requires_grad=mem_grad)
    mv = torch.empty(B, Hkv, C, d, dtype=dt, device="meta", requires_grad=mem_grad)
    idx = torch.empty(B, Hq, T, k, dtype=torch.int64, device="meta")
    rot = ()
    if case.opt("rotary"):
        rot = (torch.empty(B, C, dtype=torch.int64, device="meta"), torch.empty(8192, d, dtype=dt, device="meta"),
               torch.empty(8192, d, dtype=dt, device="meta"))
    out, lse = mod.memory_attention_triton(q, mk, mv, idx, d ** -0.5, *rot)
    if bwd:
        (out.float().sum() + lse.sum()).backward()


def _drive_local_attention(case: Case, torch, dt, load):
    mod = load("local_attention")
    B, Hq, Hkv, T, P, d = 1, 8, 2, 1024, 512, case.d
    bwd = case.pas == "bwd"
    q = torch.empty(B, Hq, T, d, dtype=dt, device="meta", requires_grad=bwd)
    k = torch.empty(B, Hkv, P + T, d, dtype=dt, device="meta", requires_grad=bwd)
    v = torch.empty(B, Hkv, P + T, d, dtype=dt, device="meta", requires_grad=bwd)
    prefix = torch.empty(B, dtype=torch.bool, device="meta") if case.opt("prefix") else None
    out, lse = mod.local_attention_triton(q, k, v, d ** -0.5, prefix)
    if bwd:
        (out.float().sum() + lse.sum()).backward()


def _drive_dkvb(case: Case, torch, dt, load):
    mod = load("dkvb")
    B, C, N, d = 4096, 8, 4096, case.d
    bwd = case.pas == "bwd"
    q = torch.empty(B, C, d, dtype=dt, device="meta")
    keys = torch.empty(C, N, d, dtype=dt, device="meta")
    values = torch.empty(C, N, d, dtype=dt, device="meta", requires_grad=bwd)
    mask = torch.empty(C, N, dtype=torch.bool, device="meta") if case.opt("mask") else None
    out, _ = mod.dkvb_lookup_triton(q, keys, values, case.opt("topk"), mask, case.opt("deterministic", False))
    if bwd:
        out.float().sum().backward()


def _drive_embedding_bag(case: Case, torch, dt, load):
    mod = load("embedding_bag")
    V, T, K = 512 * 512, 4096, 32  # a product-key memory: 512^2 values, 32 lookups per token
    bwd = case.pas == "bwd"
    weight = torch.empty(V, case.d, dtype=dt, device="meta", requires_grad=bwd)
    idx = torch.empty(T, K, dtype=torch.int64, device="meta")
    psw = torch.empty(T, K, dtype=dt, device="meta", requires_grad=bwd)
    out = mod.weighted_embedding_bag_triton(weight, idx, psw)
    if bwd:
        out.float().sum().backward()


def _drive_titans(case: Case, torch, dt, load):
    mod = load("titans")
    B, H, T, d = 1, 8, 8192, case.d
    bwd = case.pas == "bwd"

    def t(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=bwd)

    q, k, v = t(B, H, T, d), t(B, H, T, d), t(B, H, T, d)
    theta = t(B, H, T, dtype=torch.float32)
    alpha = t(B, H, T, dtype=torch.float32) if case.opt("forget", True) else None
    eta = t(B, H, T, dtype=torch.float32) if case.opt("momentum", True) else None
    if case.opt("depth") == 1:
        shapes = [(d, d)]
    else:
        hidden = case.opt("hidden", 4) * d
        shapes = [(d, hidden), (hidden, d)]
    weights = tuple(t(B, H, a, b, dtype=torch.float32) for a, b in shapes)
    momentum = tuple(t(B, H, a, b, dtype=torch.float32) for a, b in shapes) if eta is not None else None
    y, w, s = mod.titans_memory_triton(q, k, v, theta, weights, alpha, eta, momentum, case.opt("chunk"),
                                       case.opt("bias", "l2"), 3.0, 1.0, 1e-6, False)
    if bwd:
        loss = y.float().sum() + sum(x.sum() for x in w) + (sum(x.sum() for x in s) if s else 0)
        loss.backward()


DRIVERS = {
    "knn_search": _drive_knn_search,
    "memory_attention": _drive_memory_attention,
    "local_attention": _drive_local_attention,
    "dkvb": _drive_dkvb,
    "embedding_bag": _drive_embedding_bag,
    "titans": _drive_titans,
}

# The op folders whose triton*.py files hold kernels: the gate checks that every kernel found there was
# launched by some case, so a new kernel cannot slip past it.
KERNEL_FOLDERS = tuple(DRIVERS)


def cases(name: str) -> List[Case]:
    return CASE_SETS[name]()


def case_index(name: str) -> Dict[str, Case]:
    return {c.id: c for c in cases(name)}
