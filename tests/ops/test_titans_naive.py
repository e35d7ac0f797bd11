"""The Titans specification: chunked form with chunk size 1 == token recurrence (outputs, states, grads)."""
import pytest
import torch

from memlayers.ops.titans import titans_chunked_naive, titans_memory, titans_recurrent_naive
from memlayers.ops.utils.testing import assert_rel_close


def make_inputs(B, H, T, Dk, Dv, depth, hidden=None, momentum=True, forget=True, requires_grad=False, dtype=torch.float32):
    hidden = hidden or Dk
    q = torch.nn.functional.normalize(torch.randn(B, H, T, Dk), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, Dk), dim=-1)
    v = torch.randn(B, H, T, Dv)
    theta = 0.02 + 0.08 * torch.rand(B, H, T)
    alpha = 0.2 * torch.rand(B, H, T) if forget else None
    eta = 0.5 + 0.45 * torch.rand(B, H, T) if momentum else None
    if depth == 1:
        shapes = [(Dk, Dv)]
    else:
        shapes = [(Dk, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, Dv)]
    weights = tuple(torch.randn(B, H, a, b) / a**0.5 for a, b in shapes)
    mom = tuple(0.1 * torch.randn(B, H, a, b) for a, b in shapes) if momentum else None
    tensors = dict(q=q, k=k, v=v, theta=theta, alpha=alpha, eta=eta)
    out = {n: (t.to(dtype) if n in "qkv" else t) for n, t in tensors.items() if t is not None}
    out = {n: t.clone().requires_grad_(requires_grad) for n, t in out.items()}
    out.setdefault("alpha", None)
    out.setdefault("eta", None)
    out["weights"] = tuple(w.clone().requires_grad_(requires_grad) for w in weights)
    out["momentum"] = tuple(s.clone().requires_grad_(requires_grad) for s in mom) if mom else None
    return out


def leaves(inp):
    named = [(n, inp[n]) for n in ("q", "k", "v", "theta", "alpha", "eta") if inp[n] is not None]
    named += [(f"weights[{i}]", w) for i, w in enumerate(inp["weights"])]
    named += [(f"momentum[{i}]", s) for i, s in enumerate(inp["momentum"] or ())]
    return named


def run(fn, inp, **kw):
    return fn(inp["q"], inp["k"], inp["v"], inp["theta"], inp["alpha"], inp["eta"], inp["weights"], inp["momentum"], **kw)


def loss_of(out):
    y, w, s = out
    g = torch.Generator().manual_seed(1)
    total = (y * torch.randn(y.shape, generator=g)).sum()
    for t in tuple(w) + tuple(s or ()):
        total = total + (t * torch.randn(t.shape, generator=g)).sum()
    return total


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("bias", ["l2", "lp", "huber"])
@pytest.mark.parametrize("momentum,forget", [(True, True), (False, True), (True, False)])
def test_chunk_size_one_equals_recurrence(depth, bias, momentum, forget):
    inp = make_inputs(2, 2, 7, 8, 8, depth, hidden=12, momentum=momentum, forget=forget, requires_grad=True)
    kw = dict(bias=bias, p=2.5, delta=0.3)
    ref = run(titans_recurrent_naive, inp, **kw)
    out = run(titans_chunked_naive, inp, chunk_size=1, **kw)
    assert_rel_close(out[0], ref[0], 1e-5, "y")
    for a, b in zip(out[1] + (out[2] or ()), ref[1] + (ref[2] or ())):
        assert_rel_close(a, b, 1e-5, "state")
    names = [n for n, _ in leaves(inp)]
    g_ref = torch.autograd.grad(loss_of(ref), [t for _, t in leaves(inp)])
    g_out = torch.autograd.grad(loss_of(out), [t for _, t in leaves(inp)])
    for n, a, b in zip(names, g_out, g_ref):
        assert_rel_close(a, b, 2e-5, f"grad {n}")


def test_lp_with_p2_is_l2():
    inp = make_inputs(1, 2, 20, 8, 8, 1)
    a = run(titans_chunked_naive, inp, chunk_size=8, bias="l2")[0]
    b = run(titans_chunked_naive, inp, chunk_size=8, bias="lp", p=2.0)[0]
    assert_rel_close(b, a, 1e-6, "lp p=2 vs l2")


def test_huber_large_delta_is_l2_and_small_delta_differs():
    inp = make_inputs(1, 2, 20, 8, 8, 2)
    a = run(titans_chunked_naive, inp, chunk_size=8, bias="l2")[0]
    b = run(titans_chunked_naive, inp, chunk_size=8, bias="huber", delta=1e6)[0]
    c = run(titans_chunked_naive, inp, chunk_size=8, bias="huber", delta=0.01)[0]
    assert_rel_close(b, a, 1e-6, "huber large delta vs l2")
    assert (c - a).abs().max() > 1e-3


def test_chunks_use_chunk_start_gradients():
    # Larger chunks are a different (parallel) computation, close to but not equal to the recurrence.
    inp = make_inputs(1, 2, 32, 8, 8, 1)
    ref = run(titans_recurrent_naive, inp)[0]
    out = run(titans_chunked_naive, inp, chunk_size=16)[0]
    assert (out - ref).abs().max() > 1e-4


def test_long_sequence_stays_finite_linear_and_mlp():
    # 16K tokens through the torch path with gates like NeuralMemory's defaults.
    B, H, T, D = 1, 2, 16384, 16
    q = torch.nn.functional.normalize(torch.randn(B, H, T, D), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, H, T, D), dim=-1)
    v = torch.randn(B, H, T, D)
    theta = torch.full((B, H, T), 0.005)
    alpha = torch.full((B, H, T), 0.002)
    eta = torch.full((B, H, T), 0.9)
    for weights in [(torch.zeros(B, H, D, D),), (torch.randn(B, H, D, 2 * D) / 4, torch.randn(B, H, 2 * D, D) / 6)]:
        y, w, s = titans_memory(q, k, v, theta, weights, alpha=alpha, eta=eta, chunk_size=64, backend="torch")
        assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in w + s)
        assert y[:, :, -1000:].abs().max() < 100


GATE_ENDS = [0.0, 1e-6, 0.5, 1 - 1e-6, 1.0]


def with_gate_ends(inp, alpha_end, eta_end):
    """Every third token's alpha and every third (shifted) token's eta set to a value at the end of its range."""
    out = dict(inp)
    T = inp["q"].shape[2]
    alpha, eta = inp["alpha"].detach().clone(), inp["eta"].detach().clone()
    alpha[:, :, 0:T:3] = alpha_end
    eta[:, :, 1:T:3] = eta_end
    out["alpha"], out["eta"] = alpha.requires_grad_(True), eta.requires_grad_(True)
    return out


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("gate_end", GATE_ENDS)
def test_gate_gradients_at_range_ends_match_recurrence(depth, gate_end):
    # Gradients of the chunked form (chunk 1 and a real chunk) against autograd of the token
    # recurrence, which multiplies by the gates directly: no division by a gate anywhere.
    inp = with_gate_ends(make_inputs(1, 2, 9, 8, 8, depth, requires_grad=True), gate_end, gate_end)
    ref = run(titans_recurrent_naive, inp)
    g_ref = torch.autograd.grad(loss_of(ref), [inp["alpha"], inp["eta"]])
    out = run(titans_chunked_naive, inp, chunk_size=1)
    g_out = torch.autograd.grad(loss_of(out), [inp["alpha"], inp["eta"]])
    for n, a, b in zip(("alpha", "eta"), g_out, g_ref):
        assert torch.isfinite(a).all()
        assert_rel_close(a, b, 2e-5, f"grad {n} at {gate_end}")
