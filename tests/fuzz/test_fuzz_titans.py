"""Fuzz: titans_memory (torch backend, small sizes) against a brute-force fp64 loop over chunks and
tokens of the documented recurrence: inside a chunk every gradient is taken at the chunk-start
weights; token by token S_t = eta_t S_{t-1} - theta_t G_t, W_t = (1 - alpha_t) W_{t-1} + S_t,
y_t = M_t(q_t). Non-finite inputs are rejected, naming the argument."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import DTYPES, FUZZ_TORCH, assert_close, device, draw, generator, randn, size
from memlayers.ops import titans_memory

# fp32 chunked products of gates and gradients against fp64 token loops, over up to 12 tokens.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def memory(weights, x):
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.silu(h)
    return h if len(weights) == 1 else x + h


def loss(r, bias, p=3.0, delta=1.0, eps=1e-6):
    if bias == "l2":
        return (r * r).sum()
    if bias == "lp":
        return (r * r + eps).pow(p / 2).sum()
    a = r.abs()
    return torch.where(a <= delta, r * r, 2 * delta * a - delta * delta).sum()


def brute_force(q, k, v, theta, alpha, eta, weights, momentum, chunk, bias):
    B, H, T, _ = q.shape
    W = [w.double() for w in weights]
    S = [s.double() for s in momentum] if eta is not None else None
    ys = []
    for c0 in range(0, T, chunk):
        W0 = [w.detach().clone().requires_grad_() for w in W]
        tokens = range(c0, min(c0 + chunk, T))
        grads = [torch.autograd.grad(loss(memory(W0, k[:, :, t, None].double()) - v[:, :, t, None].double(), bias), W0)
                 for t in tokens]
        for t, G in zip(tokens, grads):
            th = theta[:, :, t, None, None].double()
            if S is None:
                step = [-th * g for g in G]
            else:
                S = [eta[:, :, t, None, None].double() * s - th * g for s, g in zip(S, G)]
                step = S
            keep = 1.0 if alpha is None else 1 - alpha[:, :, t, None, None].double()
            W = [keep * w + u for w, u in zip(W, step)]
            ys.append(memory(W, q[:, :, t, None].double()))
    y = torch.cat(ys, dim=2) if ys else torch.zeros(B, H, 0, v.shape[-1], dtype=torch.float64)
    return y, W, S


@given(data=st.data())
@FUZZ_TORCH
def test_titans_memory_torch(data):
    gen = generator(data)
    B, H, T = size(data, "B", 1, 2), size(data, "H", 1, 2), size(data, "T", 0, 12)
    Dk = size(data, "Dk", 1, 6)
    mlp = draw(data, st.booleans(), "mlp")
    Dv = Dk if mlp else size(data, "Dv", 1, 6)
    chunk = draw(data, st.sampled_from([1, 2, 3, 5, 16]), "chunk_size")
    bias = draw(data, st.sampled_from(["l2", "lp", "huber"]), "bias")
    dtype = draw(data, st.sampled_from(DTYPES), "dtype")
    q, k, v = (randn(gen, B, H, T, d, dtype=dtype) for d in (Dk, Dk, Dv))
    theta = (torch.rand(B, H, T, generator=gen) * 0.2).to(device=device(), dtype=dtype)
    gate = lambda: torch.rand(B, H, T, generator=gen).to(device=device(), dtype=dtype)
    alpha = gate() if draw(data, st.booleans(), "alpha") else None
    eta = gate() if draw(data, st.booleans(), "eta") else None
    if mlp:
        Dh = size(data, "Dh", 1, 5)
        weights = (randn(gen, B, H, Dk, Dh, scale=0.3), randn(gen, B, H, Dh, Dv, scale=0.3))
    else:
        weights = (randn(gen, B, H, Dk, Dv, scale=0.3),)
    momentum = tuple(randn(gen, *w.shape, scale=0.1) for w in weights) if eta is not None and draw(
        data, st.booleans(), "momentum") else None

    y, W, S = titans_memory(q, k, v, theta, weights, alpha=alpha, eta=eta, momentum=momentum, chunk_size=chunk,
                            bias=bias, backend="torch")
    init_S = momentum if momentum is not None else tuple(torch.zeros_like(w) for w in weights)
    ref_y, ref_W, ref_S = brute_force(q, k, v, theta, alpha, eta, weights, init_S, chunk, bias)
    assert y.shape == (B, H, T, Dv) and y.dtype == dtype
    assert_close(y, ref_y, TOL[dtype], "y")
    for i, (w, rw) in enumerate(zip(W, ref_W)):
        assert_close(w, rw, TOL[torch.float32], f"weights[{i}]")
    assert (S is None) == (eta is None)
    for i, (s, rs) in enumerate(zip(S or (), ref_S or ())):
        assert_close(s, rs, TOL[torch.float32], f"momentum[{i}]")


@given(data=st.data())
@FUZZ_TORCH
def test_titans_memory_rejects_non_finite_inputs(data):
    gen = generator(data)
    B, H, T, D = 1, 2, size(data, "T", 1, 6), size(data, "D", 1, 4)
    args = dict(q=randn(gen, B, H, T, D), k=randn(gen, B, H, T, D), v=randn(gen, B, H, T, D),
                theta=torch.full((B, H, T), 0.1, device=device()))
    W0 = randn(gen, B, H, D, D)
    name = draw(data, st.sampled_from(["q", "k", "v", "theta", "weights[0]"]), "poisoned")
    target = W0 if name == "weights[0]" else args[name]
    target.view(-1)[size(data, "at", 0, target.numel() - 1)] = draw(
        data, st.sampled_from([float("nan"), float("inf"), float("-inf")]), "value")
    before = W0.clone()
    with pytest.raises(ValueError, match=rf"{name.replace('[', '.').replace(']', '.')} contains non-finite"):
        titans_memory(args["q"], args["k"], args["v"], args["theta"], (W0,), chunk_size=2, backend="torch")
    assert torch.equal(W0.nan_to_num(), before.nan_to_num())  # nothing written
