"""local_attention: the Triton flash kernel against the naive path (output, lse and every gradient, with
upstream gradients on both outputs), the naive path against SDPA, prefix handling, and bad input."""
import pytest
import torch
import torch.nn.functional as F

from memlayers.ops.local_attention import local_attention, local_attention_naive
from memlayers.ops.utils.testing import TOLERANCE, assert_rel_close, poison_


def make_case(device, dtype, B, Hq, Hkv, T, P, D, Dv, prefix):
    """Random inputs; prefix: None (no mask), "all" (every row sees it) or "mixed" (row 0 only)."""
    S = P + T
    q = torch.randn(B, Hq, T, D, device=device).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, S, D, device=device).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, S, Dv, device=device).to(dtype).requires_grad_()
    valid = None
    if prefix is not None:
        valid = torch.ones(B, dtype=torch.bool, device=device)
        if prefix == "mixed":
            valid[1:] = False
    return q, k, v, valid


def run(backend, q, k, v, valid, g_out, g_lse):
    out, lse = local_attention(q, k, v, prefix_valid=valid, backend=backend)
    loss = (out.float() * g_out).sum() + (lse * g_lse).sum()
    return (out, lse) + torch.autograd.grad(loss, (q, k, v))


CASES = [
    # B, Hq, Hkv, T, P, D, Dv, prefix
    (1, 2, 2, 1, 0, 16, 16, None),        # T = 1, no GQA
    (2, 2, 1, 1, 5, 16, 16, "mixed"),     # T = 1 behind a prefix that one row hides
    (2, 4, 2, 17, 0, 64, 64, None),       # GQA, one query block
    (2, 4, 2, 63, 30, 64, 64, "mixed"),   # GQA, prefix start off the block grid
    (2, 4, 1, 100, 100, 80, 48, "mixed"),  # multi-query, D = 80, Dv != D; a key block wholly hidden
    (1, 3, 3, 100, 17, 80, 80, "all"),    # no GQA, prefix given as all-True
]
NAMES = ("out", "lse", "dq", "dk", "dv")


@pytest.mark.parametrize("B,Hq,Hkv,T,P,D,Dv,prefix", CASES)
def test_triton_matches_naive_fp32(device, B, Hq, Hkv, T, P, D, Dv, prefix):
    q, k, v, valid = make_case(device, torch.float32, B, Hq, Hkv, T, P, D, Dv, prefix)
    g_out, g_lse = torch.randn(B, Hq, T, Dv, device=device), torch.randn(B, Hq, T, device=device)
    got = run("triton", q, k, v, valid, g_out, g_lse)
    ref = run("torch", q, k, v, valid, g_out, g_lse)
    for name, a, b in zip(NAMES, got, ref):
        assert_rel_close(a, b, 1e-5, name)


@pytest.mark.parametrize("B,Hq,Hkv,T,P,D,Dv,prefix", [CASES[3], (1, 2, 1, 100, 0, 80, 80, None)])
def test_triton_matches_naive_bf16(device, B, Hq, Hkv, T, P, D, Dv, prefix):
    dt = torch.bfloat16
    q, k, v, valid = make_case(device, dt, B, Hq, Hkv, T, P, D, Dv, prefix)
    g_out, g_lse = torch.randn(B, Hq, T, Dv, device=device), torch.randn(B, Hq, T, device=device)
    got = run("triton", q, k, v, valid, g_out, g_lse)
    ref = run("torch", q, k, v, valid, g_out, g_lse)
    out, lse, *grads = got
    assert out.dtype == dt and lse.dtype == torch.float32 and all(g.dtype == dt for g in grads)
    for name, a, b in zip(NAMES, got, ref):
        assert_rel_close(a, b, TOLERANCE[dt], name)


def test_kernels_write_every_output(device):
    """Host launchers on NaN-poisoned buffers: every element of out, lse, dq, dk and dv is written."""
    from memlayers.ops.local_attention.triton import local_attention_bwd, local_attention_fwd

    B, Hq, Hkv, T, P, D, Dv = 2, 2, 1, 70, 70, 16, 32
    q, k, v, valid = make_case(device, torch.float32, B, Hq, Hkv, T, P, D, Dv, "mixed")
    q, k, v = q.detach(), k.detach(), v.detach()
    scale = 0.3
    out = poison_(torch.empty(B, Hq, T, Dv, device=device))
    lse = poison_(torch.empty(B, Hq, T, device=device))
    local_attention_fwd(q, k, v, scale, valid, out=out, lse=lse)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    grads = tuple(poison_(torch.empty_like(x)) for x in (q, k, v))
    local_attention_bwd(g_out, g_lse, q, k, v, out, lse, scale, valid, *grads)

    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v))
    ref_out, ref_lse = local_attention_naive(*leaves, scale, valid)
    ref_grads = torch.autograd.grad((ref_out * g_out).sum() + (ref_lse * g_lse).sum(), leaves)
    for name, a, b in zip(NAMES, (out, lse) + grads, (ref_out, ref_lse) + ref_grads):
        assert_rel_close(a, b, 1e-5, name)
    # Row 1 hides its prefix: no gradient may reach those keys and values.
    assert bool((grads[1][1, :, :P] == 0).all() and (grads[2][1, :, :P] == 0).all())


@pytest.mark.parametrize("through", ["out", "lse"])
def test_gradient_through_one_output_and_strided_inputs(device, through):
    """q, k, v as transposed [B, T, H, D] views; a loss through out only, or lse only (the other
    output's gradient is absent)."""
    B, T, P, H, D = 1, 40, 9, 2, 32
    bases = [torch.randn(B, n, H, D, device=device, requires_grad=True) for n in (T, P + T, P + T)]
    res = []
    for backend in ("triton", "torch"):
        out, lse = local_attention(*(x.transpose(1, 2) for x in bases), backend=backend)
        loss = out.square().sum() if through == "out" else lse.exp().sum()
        res.append(torch.autograd.grad(loss, bases, materialize_grads=True))  # lse alone: dv = 0
    for name, a, b in zip(("dq", "dk", "dv"), *res):
        assert_rel_close(a, b, 1e-5, name)


def test_naive_matches_sdpa():
    """The specification: with every prefix visible, attention over [prefix, segment] is SDPA with a
    causal mask shifted by P; lse is the log-sum-exp of those scores."""
    B, Hq, Hkv, T, P, D = 2, 4, 2, 9, 5, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, P + T, D), torch.randn(B, Hkv, P + T, D)
    out, lse = local_attention(q, k, v, backend="torch")
    open_ = torch.ones(T, P + T, dtype=torch.bool).tril(P)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=open_, enable_gqa=True)
    torch.testing.assert_close(out, ref)
    s = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * D ** -0.5
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~open_, float("-inf")), -1))


def test_hidden_prefix_equals_no_prefix(device):
    """A row whose prefix is hidden gets exactly the attention over its segment alone."""
    q, k, v, valid = make_case(device, torch.float32, 2, 2, 2, 30, 20, 16, 16, "mixed")
    out, lse = local_attention(q, k, v, prefix_valid=valid)
    alone, alone_lse = local_attention(q[1:], k[1:, :, 20:], v[1:, :, 20:])
    assert_rel_close(out[1:], alone, 1e-5, "out")
    assert_rel_close(lse[1:], alone_lse, 1e-5, "lse")


def test_empty_segment():
    out, lse = local_attention(torch.randn(1, 2, 0, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 6))
    assert out.shape == (1, 2, 0, 6) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("change,exc,words", [
    (lambda a: {**a, "q": a["q"][0]}, ValueError, "q must have 4 dimensions"),
    (lambda a: {**a, "k": a["k"].double()}, TypeError, "k must have dtype"),
    (lambda a: {**a, "k": torch.randn(1, 3, 6, 8), "v": torch.randn(1, 3, 6, 8)}, ValueError, "multiple of k's head"),
    (lambda a: {**a, "k": a["k"][:, :, :2], "v": a["v"][:, :, :2]}, ValueError, "at least the T=3 keys"),
    (lambda a: {**a, "v": torch.randn(1, 2, 6, 300)}, ValueError, "head dims must be in"),
    (lambda a: {**a, "prefix_valid": torch.ones(1)}, TypeError, "prefix_valid must have dtype"),
    (lambda a: {**a, "scale": float("inf")}, TypeError, "scale must be a finite"),
    (lambda a: {**a, "backend": "cuda"}, ValueError, "backend must be one of"),
])
def test_bad_input(change, exc, words):
    args = change(dict(q=torch.randn(1, 4, 3, 8), k=torch.randn(1, 2, 6, 8), v=torch.randn(1, 2, 6, 8)))
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=words):
        local_attention(q, k, v, **args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_triton_matches_naive_large(device, dtype, D):
    B, Hq, Hkv, T, P = 2, 16, 4, 1000, 777
    q, k, v, valid = make_case(device, dtype, B, Hq, Hkv, T, P, D, D, "mixed")
    g_out, g_lse = torch.randn(B, Hq, T, D, device=device), torch.randn(B, Hq, T, device=device)
    got = run("triton", q, k, v, valid, g_out, g_lse)
    ref = run("torch", q, k, v, valid, g_out, g_lse)
    for name, a, b in zip(NAMES, got, ref):
        assert_rel_close(a, b, TOLERANCE[dtype], name)


@pytest.mark.gpu
def test_triton_matches_sdpa_long_segment(device):
    """A 4096-token causal segment in bf16 against PyTorch's own SDPA (no prefix, GQA)."""
    q = torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16)
    k, v = torch.randn(2, 1, 2, 4096, 128, device=device, dtype=torch.bfloat16)
    out, _ = local_attention(q, k, v, backend="triton")
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert_rel_close(out, ref, TOLERANCE[torch.bfloat16], "out")
