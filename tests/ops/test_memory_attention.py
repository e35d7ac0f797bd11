"""memory_attention: the Triton kernel against the naive path (output, lse and every gradient),
merge_attention against one softmax over the union of key sets, and bad input."""
import importlib

import pytest
import torch

from memlayers.ops.memory_attention import memory_attention, memory_attention_naive, merge_attention
from memlayers.ops.utils.testing import TOLERANCE, assert_rel_close, poison_


def rotary_tables(P, D, device, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().float().to(device), ang.sin().float().to(device)


def make_case(device, dtype, B, Hq, Hkv, T, D, Dv, C, k, rotary, mem_grad=True, missing=0.2):
    q = torch.randn(B, Hq, T, D, device=device).to(dtype).requires_grad_()
    keys = torch.randn(B, Hkv, C, D, device=device).to(dtype).requires_grad_(mem_grad)
    values = torch.randn(B, Hkv, C, Dv, device=device).to(dtype).requires_grad_(mem_grad)
    # Repeated slots on purpose: several queries (and heads of a group) read and scatter into one row.
    idx = torch.randint(0, C, (B, Hq, T, k), device=device)
    idx = idx.masked_fill(torch.rand(idx.shape, device=device) < missing, -1)
    idx[0, 0, 0] = -1  # one query with no memory at all
    kw = {}
    if rotary:
        P = 3 * C
        cos, sin = rotary_tables(P, D, device)
        kw = dict(mem_positions=torch.randint(0, P, (B, C), device=device), rotary_cos=cos, rotary_sin=sin)
    return q, keys, values, idx, kw


def loss_of(out, lse, g_out, g_lse):
    # lse enters the loss (as it does through merge_attention); -inf rows contribute nothing.
    return (out.float() * g_out).sum() + (torch.where(torch.isfinite(lse), lse, 0) * g_lse).sum()


def run(backend, q, keys, values, idx, kw, g_out, g_lse):
    out, lse = memory_attention(q, keys, values, idx, backend=backend, **kw)
    wrt = [t for t in (q, keys, values) if t.requires_grad]
    grads = torch.autograd.grad(loss_of(out, lse, g_out, g_lse), wrt)
    return out, lse, grads


CASES = [
    # B, Hq, Hkv, T, D, Dv, C, k, rotary
    (1, 2, 2, 1, 16, 16, 40, 5, False),     # T = 1, no GQA
    (2, 4, 2, 63, 64, 64, 70, 33, True),    # GQA, k not a power of two spanning two k-blocks, rotate on read
    (1, 4, 1, 100, 80, 80, 120, 5, False),  # multi-query, head dim 80
    (1, 2, 1, 17, 16, 48, 30, 33, True),    # Dv != D, k > C (every slot repeats)
]


@pytest.mark.parametrize("B,Hq,Hkv,T,D,Dv,C,k,rotary", CASES)
def test_triton_matches_naive_fp32(device, B, Hq, Hkv, T, D, Dv, C, k, rotary):
    q, keys, values, idx, kw = make_case(device, torch.float32, B, Hq, Hkv, T, D, Dv, C, k, rotary)
    g_out = torch.randn(B, Hq, T, Dv, device=device)
    g_lse = torch.randn(B, Hq, T, device=device)
    out, lse, grads = run("triton", q, keys, values, idx, kw, g_out, g_lse)
    ref_out, ref_lse, ref_grads = run("torch", q, keys, values, idx, kw, g_out, g_lse)

    assert_rel_close(out, ref_out, 1e-5, "out")
    empty = torch.isinf(ref_lse)
    assert bool(empty[0, 0, 0]) and torch.equal(torch.isinf(lse), empty), "lse = -inf exactly for empty queries"
    assert bool((out[empty] == 0).all()), "empty queries give out = 0"
    assert_rel_close(lse[~empty], ref_lse[~empty], 1e-5, "lse")
    for name, g, ref in zip(("dq", "dmem_keys", "dmem_values"), grads, ref_grads):
        assert_rel_close(g, ref, 1e-5, name)


def test_triton_matches_naive_bf16(device):
    dt = torch.bfloat16
    q, keys, values, idx, kw = make_case(device, dt, 1, 4, 2, 33, 64, 64, 50, 7, rotary=True)
    g_out = torch.randn(1, 4, 33, 64, device=device)
    g_lse = torch.randn(1, 4, 33, device=device)
    out, lse, grads = run("triton", q, keys, values, idx, kw, g_out, g_lse)
    ref_out, ref_lse, ref_grads = run("torch", q, keys, values, idx, kw, g_out, g_lse)
    assert out.dtype == dt and lse.dtype == torch.float32
    assert all(g.dtype == dt for g in grads)
    tol = TOLERANCE[dt]
    assert_rel_close(out, ref_out, tol, "out")
    finite = torch.isfinite(ref_lse)
    assert_rel_close(lse[finite], ref_lse[finite], tol, "lse")
    for name, g, ref in zip(("dq", "dmem_keys", "dmem_values"), grads, ref_grads):
        assert_rel_close(g, ref, tol, name)


def test_kernel_writes_every_output(device):
    """Host launchers on NaN-poisoned buffers: every element of out, lse and dq must be written."""
    from memlayers.ops.memory_attention.triton import memory_attention_bwd, memory_attention_fwd

    q, keys, values, idx, kw = make_case(device, torch.float32, 2, 2, 1, 37, 16, 16, 25, 6, rotary=True,
                                         mem_grad=False)
    B, Hq, T, D = q.shape
    scale = D ** -0.5
    args = (kw["mem_positions"], kw["rotary_cos"], kw["rotary_sin"])
    out = poison_(torch.empty(B, Hq, T, 16, device=device))
    lse = poison_(torch.empty(B, Hq, T, device=device))
    memory_attention_fwd(q.detach(), keys, values, idx, scale, *args, out=out, lse=lse)
    ref_out, ref_lse = memory_attention_naive(q.detach(), keys, values, idx, scale, *args)
    assert_rel_close(out, ref_out, 1e-5, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and not bool(lse.isnan().any())

    g = torch.randn_like(out)
    dq = poison_(torch.empty_like(q))
    memory_attention_bwd(g, None, q.detach(), keys, values, idx, out, lse, scale, *args, dq=dq)
    qr = q.detach().requires_grad_()
    ref_dq, = torch.autograd.grad((memory_attention_naive(qr, keys, values, idx, scale, *args)[0] * g).sum(), qr)
    assert_rel_close(dq, ref_dq, 1e-5, "dq")


def test_noncontiguous_q_and_unused_lse(device):
    """q as a transposed [B, T, H, D] view; a loss through out only (grad_lse is None)."""
    B, T, Hq, D = 1, 20, 2, 16
    base = torch.randn(B, T, Hq, D, device=device, requires_grad=True)
    keys, values = torch.randn(B, 2, 30, D, device=device), torch.randn(B, 2, 30, D, device=device)
    idx = torch.randint(-1, 30, (B, Hq, T, 9), device=device)
    res = []
    for backend in ("triton", "torch"):
        out, _ = memory_attention(base.transpose(1, 2), keys, values, idx, backend=backend)
        res.append((out, torch.autograd.grad(out.square().sum(), base)[0]))
    assert_rel_close(res[0][0], res[1][0], 1e-5, "out")
    assert_rel_close(res[0][1], res[1][1], 1e-5, "dq")


# C = 12: the queries read more rows than there are slots (every slot is rotated once, then read);
# C = 200: fewer (the rows read are rotated). Keys as given, or dim-major as KNNMemory keeps them on CPU.
@pytest.mark.parametrize("C", [12, 200])
@pytest.mark.parametrize("dim_major", [False, True])
def test_naive_matches_explicit_softmax(C, dim_major):
    """The specification itself, against a per-query loop over its retrieved rows (rotary, GQA)."""
    B, Hq, Hkv, T, D, k = 1, 4, 2, 3, 8, 5
    q, keys, values = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
    if dim_major:
        keys = keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    idx = torch.randint(-1, C, (B, Hq, T, k))
    pos = torch.randint(0, 40, (B, C))
    cos, sin = rotary_tables(40, D, "cpu")
    out, lse = memory_attention(q, keys, values, idx, mem_positions=pos, rotary_cos=cos, rotary_sin=sin,
                                backend="torch")
    for h in range(Hq):
        for t in range(T):
            sel = idx[0, h, t][idx[0, h, t] >= 0]
            if len(sel) == 0:
                assert lse[0, h, t] == float("-inf") and bool((out[0, h, t] == 0).all())
                continue
            kk = keys[0, h // 2, sel]
            p = pos[0, sel][:, None]
            kr = kk * cos[p[:, 0]] + torch.cat([-kk[:, D // 2:], kk[:, : D // 2]], -1) * sin[p[:, 0]]
            s = kr @ q[0, h, t] * D ** -0.5
            torch.testing.assert_close(lse[0, h, t], torch.logsumexp(s, 0))
            torch.testing.assert_close(out[0, h, t], s.softmax(0) @ values[0, h // 2, sel])


# Blocks of one query and of 3 (T = 7 leaves a partial block), both read paths (C = 12 and 200).
@pytest.mark.parametrize("C", [12, 200])
@pytest.mark.parametrize("block_queries", [1, 3])
def test_naive_query_blocks_change_nothing(monkeypatch, C, block_queries):
    """The CPU path reads its queries' rows a block at a time: out and lse equal one block's bit for bit,
    gradients up to the order in which the blocks' reads of one slot add up."""
    naive = importlib.import_module("memlayers.ops.memory_attention.naive")  # the package's name is also the op's

    B, Hq, Hkv, T, D, Dv, k = 2, 6, 3, 7, 8, 6, 5
    q = torch.randn(B, Hq, T, D, requires_grad=True)
    keys = torch.randn(B, Hkv, C, D, requires_grad=True)
    values = torch.randn(B, Hkv, C, Dv, requires_grad=True)
    idx = torch.randint(-1, C, (B, Hq, T, k))
    pos = torch.randint(0, 40, (B, C))
    cos, sin = rotary_tables(40, D, "cpu")
    results = []
    for elements in (1 << 30, block_queries * B * Hq * k * D):
        monkeypatch.setattr(naive, "READ_BLOCK_ELEMENTS", elements)
        out, lse = memory_attention(q, keys, values, idx, mem_positions=pos, rotary_cos=cos, rotary_sin=sin,
                                    backend="torch")
        results.append((out, lse, *torch.autograd.grad((out.square().sum() + lse[lse.isfinite()].sum()), (q, keys, values))))
    for i, (whole, blocked) in enumerate(zip(*results)):
        torch.testing.assert_close(blocked, whole, **({"rtol": 0, "atol": 0} if i < 2 else {}))


def test_merge_attention_is_one_softmax():
    """Two partial softmaxes over disjoint key sets merge into the softmax over their union."""
    T, Dv = 6, 8
    s = torch.randn(T, 10, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, Dv, dtype=torch.float64)
    a, b = slice(0, 4), slice(4, 10)
    out_a, lse_a = s[:, a].softmax(-1) @ v[a], torch.logsumexp(s[:, a], -1)
    out_b, lse_b = s[:, b].softmax(-1) @ v[b], torch.logsumexp(s[:, b], -1)
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, s.softmax(-1) @ v)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-6, atol=1e-6)
    g = torch.autograd.grad(out.sum() + lse.sum(), s)[0]
    ref = torch.autograd.grad((s.softmax(-1) @ v).sum() + torch.logsumexp(s, -1).sum(), s)[0]
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6)


def test_merge_attention_empty_sides():
    out_a = torch.randn(2, 3, 4, requires_grad=True)
    lse_a = torch.randn(2, 3)
    lse_a[0] = float("-inf")
    out_b = torch.randn(2, 3, 4, requires_grad=True)
    lse_b = torch.full((2, 3), float("-inf"))
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out[1], out_a[1])  # B empty: A alone
    torch.testing.assert_close(lse[1], lse_a[1])
    assert bool((out[0] == 0).all()) and bool(torch.isneginf(lse[0]).all())  # both empty
    ga, gb = torch.autograd.grad(out.sum(), (out_a, out_b))
    assert bool(torch.isfinite(ga).all() and torch.isfinite(gb).all())
    assert bool((gb == 0).all()) and bool((ga[1] == 1).all())


def _good(C=10):
    return (torch.randn(1, 4, 3, 8), torch.randn(1, 2, C, 8), torch.randn(1, 2, C, 6),
            torch.randint(-1, C, (1, 4, 3, 5)))


@pytest.mark.parametrize("change,exc,words", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have 4 dimensions"),
    (lambda a: {**a, "q": a["q"].double()}, TypeError, "q must have dtype"),
    (lambda a: {**a, "mem_keys": a["mem_keys"].half()}, TypeError, "mem_keys must have dtype"),
    (lambda a: {**a, "mem_keys": torch.randn(1, 3, 10, 8)}, ValueError, "multiple of mem_keys' head count"),
    (lambda a: {**a, "mem_values": torch.randn(1, 2, 9, 6)}, ValueError, "mem_values has size 9"),
    (lambda a: {**a, "indices": a["indices"].float()}, TypeError, "indices must have dtype"),
    (lambda a: {**a, "indices": torch.full((1, 4, 3, 5), 10)}, ValueError, "slot ids in 0..9"),
    (lambda a: {**a, "indices": torch.full((1, 4, 3, 5), -2)}, ValueError, "indices must be -1"),
    (lambda a: {**a, "scale": float("nan")}, TypeError, "scale must be a finite"),
    (lambda a: {**a, "rotary_cos": torch.ones(4, 8)}, ValueError, "needs all of mem_positions"),
    (lambda a: {**a, "mem_positions": torch.zeros(1, 10, dtype=torch.long), "rotary_cos": torch.ones(4, 7),
                "rotary_sin": torch.ones(4, 7)}, ValueError, "rotary_cos has size 7"),
    (lambda a: {**a, "mem_positions": torch.full((1, 10), 4), "rotary_cos": torch.ones(4, 8),
                "rotary_sin": torch.ones(4, 8)}, ValueError, "mem_positions of the retrieved slots"),
    (lambda a: {**a, "backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_bad_input(change, exc, words):
    q, k, v, i = _good()
    args = change(dict(q=q, mem_keys=k, mem_values=v, indices=i))
    with pytest.raises(exc, match=words):
        memory_attention(**args)


def test_merge_attention_bad_input():
    with pytest.raises(ValueError, match="lse_b has size"):
        merge_attention(torch.randn(2, 3, 4), torch.randn(2, 3), torch.randn(2, 3, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="out_b must be a torch.Tensor"):
        merge_attention(torch.randn(2, 3, 4), torch.randn(2, 3), None, torch.randn(2, 3))


def test_empty_memory_gives_empty_queries():
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    out, lse = memory_attention(q, torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8),
                                torch.full((1, 2, 4, 3), -1))
    assert out.shape == (1, 2, 4, 8) and bool((out == 0).all()) and bool(torch.isneginf(lse).all())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_matches_naive_large(device, dtype, D):
    q, keys, values, idx, kw = make_case(device, dtype, 2, 16, 4, 1000, D, D, 4096, 32, rotary=True)
    g_out = torch.randn(2, 16, 1000, D, device=device)
    g_lse = torch.randn(2, 16, 1000, device=device)
    out, lse, grads = run("triton", q, keys, values, idx, kw, g_out, g_lse)
    ref_out, ref_lse, ref_grads = run("torch", q, keys, values, idx, kw, g_out, g_lse)
    tol = TOLERANCE[dtype]
    assert_rel_close(out, ref_out, tol, "out")
    finite = torch.isfinite(ref_lse)
    assert_rel_close(lse[finite], ref_lse[finite], tol, "lse")
    for name, g, ref in zip(("dq", "dmem_keys", "dmem_values"), grads, ref_grads):
        assert_rel_close(g, ref, tol, name)
