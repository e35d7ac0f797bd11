"""Fuzz: memory_attention, local_attention and merge_attention against brute-force fp64 softmax
attention (forward and, for fp32 inputs, every gradient), NaN queries included."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import (DTYPES, GRAD_TOL, OUT_TOL, assert_close, backends, device, draw, fuzz_settings, generator,
                          randn, size)
from memlayers.ops import local_attention, memory_attention, merge_attention

# NaN placements make the Triton interpreter (numpy) warn about invalid values; they are expected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def softmax_attention(scores, values):
    """scores [..., n] with -inf where hidden, values [..., n, Dv] -> (out [..., Dv], lse [...]) in fp64;
    a query that sees nothing gets out = 0, lse = -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return (p[..., None] * values).sum(-2), lse


def memory_attention_brute_force(q, mk, mv, idx, scale, rotary):
    B, Hq, T, D = q.shape
    if mk.shape[2] == 0:  # no slot to gather: every query is empty (the sum links the gradients)
        link = q.sum() * 0 + mk.sum() + mv.sum()
        return q.new_zeros(B, Hq, T, mv.shape[-1]) + link, q.new_full((B, Hq, T), float("-inf")) + link
    group = Hq // mk.shape[1]
    keys = mk.double().repeat_interleave(group, dim=1)      # [B, Hq, C, D]
    values = mv.double().repeat_interleave(group, dim=1)
    if rotary is not None:
        positions, cos, sin = rotary
        p = positions.long()[:, None, :]                    # [B, 1, C]
        keys = keys * cos.double()[p] + rotate_half(keys) * sin.double()[p]
    safe = idx.long().clamp_min(0)
    k = idx.shape[-1]
    g = lambda buf: buf.gather(2, safe.reshape(B, Hq, T * k, 1).expand(-1, -1, -1, buf.shape[-1])).reshape(
        B, Hq, T, k, buf.shape[-1])
    s = (q.double()[..., None, :] * g(keys)).sum(-1) * scale
    return softmax_attention(s.masked_fill(idx < 0, float("-inf")), g(values))


def loss_of(out, lse, g_out, g_lse):
    return (out.double() * g_out).sum() + (torch.where(torch.isfinite(lse), lse.double(), 0.0) * g_lse).sum()


def check_grads(op_out, ref_out, inputs, refs, gen, what):
    g_out = torch.randn(op_out[0].shape, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(op_out[1].shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(loss_of(*op_out, g_out.to(device()), g_lse.to(device())), inputs)
    ref_grads = torch.autograd.grad(loss_of(*ref_out, g_out, g_lse), refs)
    for name, g, r in zip(what, grads, ref_grads):
        assert_close(g, r, GRAD_TOL, f"grad {name}")


@pytest.mark.parametrize("backend", backends())
def test_memory_attention(backend):
    @fuzz_settings(backend)
    @given(data=st.data())
    def check(data):
        gen = generator(data)
        B, Hkv, group = size(data, "B", 0, 2), size(data, "Hkv", 1, 2), size(data, "group", 1, 3)
        T, C, k = size(data, "T", 0, 6), size(data, "C", 0, 30), size(data, "k", 0, 7)
        D, Dv = 2 * size(data, "D/2", 1, 12), size(data, "Dv", 1, 20)
        dtype = draw(data, st.sampled_from(DTYPES), "dtype")
        Hq = Hkv * group
        q, mk, mv = randn(gen, B, Hq, T, D, dtype=dtype), randn(gen, B, Hkv, C, D, dtype=dtype), randn(gen, B, Hkv, C, Dv, dtype=dtype)
        idx = torch.randint(-1, C, (B, Hq, T, k), generator=gen) if C else torch.full((B, Hq, T, k), -1)
        rotary = None
        if C and draw(data, st.booleans(), "rotary"):
            P = size(data, "P", 1, 40)
            angles = torch.rand(P, D // 2, generator=gen, dtype=torch.float64) * 6.3
            cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
            rotary = (torch.randint(0, P, (B, C), generator=gen).to(device()), cos.float().to(device()), sin.float().to(device()))
        if B and T and draw(data, st.booleans(), "NaN query"):
            q[size(data, "b", 0, B - 1), size(data, "h", 0, Hq - 1), size(data, "t", 0, T - 1), 0] = float("nan")
        scale = draw(data, st.sampled_from([None, 0.3]), "scale")
        eff_scale = D ** -0.5 if scale is None else scale
        grads = dtype == torch.float32
        inputs = [t.requires_grad_(grads) for t in (q, mk, mv)]
        rot_kw = {} if rotary is None else dict(mem_positions=rotary[0], rotary_cos=rotary[1], rotary_sin=rotary[2])
        out, lse = memory_attention(*inputs, idx.to(device()), scale=scale, backend=backend, **rot_kw)

        refs = [t.detach().cpu().double().requires_grad_(grads) for t in inputs]
        ref_rot = None if rotary is None else tuple(r.cpu() for r in rotary)
        ref_out, ref_lse = memory_attention_brute_force(*refs, idx, eff_scale, ref_rot)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_close(out, ref_out, OUT_TOL[dtype], "out")     # a NaN query: NaN in its own row only
        assert_close(lse, ref_lse, 1e-5, "lse")
        if grads and not bool(q.isnan().any()):
            check_grads((out, lse), (ref_out, ref_lse), inputs, refs, gen, ("q", "mem_keys", "mem_values"))

    check()


@pytest.mark.parametrize("backend", backends())
def test_local_attention(backend):
    @fuzz_settings(backend)
    @given(data=st.data())
    def check(data):
        gen = generator(data)
        B, Hkv, group = size(data, "B", 0, 2), size(data, "Hkv", 1, 2), size(data, "group", 1, 3)
        T, P, D, Dv = size(data, "T", 0, 20), size(data, "P", 0, 20), size(data, "D", 1, 24), size(data, "Dv", 1, 20)
        dtype = draw(data, st.sampled_from(DTYPES), "dtype")
        Hq, S = Hkv * group, P + T
        q, k, v = randn(gen, B, Hq, T, D, dtype=dtype), randn(gen, B, Hkv, S, D, dtype=dtype), randn(gen, B, Hkv, S, Dv, dtype=dtype)
        prefix_valid = (torch.rand(B, generator=gen) < 0.5).to(device()) if draw(data, st.booleans(), "prefix_valid") else None
        if B and T and draw(data, st.booleans(), "NaN query"):
            q[size(data, "b", 0, B - 1), size(data, "h", 0, Hq - 1), size(data, "t", 0, T - 1), 0] = float("nan")
        grads = dtype == torch.float32
        inputs = [t.requires_grad_(grads) for t in (q, k, v)]
        out, lse = local_attention(*inputs, prefix_valid=prefix_valid, backend=backend)

        refs = [t.detach().cpu().double().requires_grad_(grads) for t in inputs]
        qq, kk, vv = refs[0], refs[1].repeat_interleave(group, dim=1), refs[2].repeat_interleave(group, dim=1)
        key, row = torch.arange(S), torch.arange(T)
        visible = (key[None, :] <= row[:, None] + P)[None].expand(B, T, S)
        if prefix_valid is not None:
            visible = visible & ((key >= P)[None, None, :] | prefix_valid.cpu()[:, None, None])
        s = (qq @ kk.transpose(-1, -2)) * D ** -0.5
        ref_out, ref_lse = softmax_attention(s.masked_fill(~visible[:, None], float("-inf")), vv[:, :, None])
        assert_close(out, ref_out, OUT_TOL[dtype], "out")
        assert_close(lse, ref_lse, 1e-5, "lse")
        if grads and not bool(q.isnan().any()):
            check_grads((out, lse), (ref_out, ref_lse), inputs, refs, gen, ("q", "k", "v"))

    check()


@given(data=st.data())
@fuzz_settings("torch")
def test_merge_attention(data):
    """The merge of two partial softmaxes equals one softmax over both key sets (from raw scores)."""
    gen = generator(data)
    lead = tuple(size(data, f"dim{i}", 0, 3) for i in range(size(data, "rank", 0, 3)))
    na, nb, Dv = size(data, "keys a", 0, 5), size(data, "keys b", 0, 5), size(data, "Dv", 1, 9)
    dtype = draw(data, st.sampled_from(DTYPES + (torch.float64,)), "dtype")
    scores = torch.randn(*lead, na + nb, generator=gen, dtype=torch.float64) * 3
    hidden = torch.rand(*lead, na + nb, generator=gen) < 0.3    # some keys hidden: empty sides happen
    scores = scores.masked_fill(hidden, float("-inf"))
    values = torch.randn(*lead, na + nb, Dv, generator=gen, dtype=torch.float64)
    out_a, lse_a = softmax_attention(scores[..., :na], values[..., :na, :])
    out_b, lse_b = softmax_attention(scores[..., na:], values[..., na:, :])
    ref_out, ref_lse = softmax_attention(scores, values)
    grads = dtype in (torch.float32, torch.float64)
    args = [t.to(device=device(), dtype=dtype).requires_grad_(grads) for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = merge_attention(*args)
    assert out.dtype == dtype
    assert_close(out, ref_out, OUT_TOL.get(dtype, 1e-5) if dtype != torch.float32 else 1e-5, "out")
    assert_close(lse, ref_lse, 1e-5 if dtype in (torch.float32, torch.float64) else 1e-2, "lse")
    if grads:
        g = torch.autograd.grad(loss_of(out, lse, torch.ones_like(ref_out), torch.ones_like(ref_lse)), args)
        assert all(bool(torch.isfinite(x).all()) for x in g), "non-finite gradient (an empty side must give 0)"
