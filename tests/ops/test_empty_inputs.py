"""Issue 14, empty inputs: zero-length sequences, no lookups (K = 0), no codebooks or memory slots
(C = 0), no results asked (k = 0) give empty outputs of the right shapes, and backward gives every
input a zero gradient of its own shape, on every backend."""
import pytest
import torch

from memlayers.ops import dkvb_lookup, knn_search, local_attention, memory_attention, weighted_embedding_bag

BACKENDS = ["torch", "triton"]


def leaf(*shape):
    return torch.randn(*shape).requires_grad_()


def grads_of(outputs, inputs):
    """Gradients of a loss over ``outputs`` (those that are part of the graph) w.r.t. ``inputs``."""
    loss = sum(o.float().nan_to_num(neginf=0.0).sum() for o in outputs if o.requires_grad)
    return torch.autograd.grad(loss, inputs, allow_unused=False)


def assert_zero_grads(grads, inputs):
    for g, x in zip(grads, inputs):
        assert g.shape == x.shape and not bool(g.any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, K, V", [(0, 3, 10), (4, 0, 10), (4, 0, 0), (0, 0, 5)])
def test_weighted_embedding_bag(backend, T, K, V):
    weight, psw = leaf(V, 6), leaf(T, K)
    out = weighted_embedding_bag(weight, torch.zeros(T, K, dtype=torch.long), psw, backend=backend)
    assert out.shape == (T, 6) and not bool(out.any())
    assert_zero_grads(grads_of([out], (weight, psw)), (weight, psw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, C", [(0, 3), (4, 0), (0, 0)])
def test_dkvb_lookup(backend, B, C):
    values = leaf(C, 5, 7)
    out, idx = dkvb_lookup(torch.randn(B, C, 4), torch.randn(C, 5, 4), values, 2, backend=backend)
    assert out.shape == (B, C, 7) and idx.shape == (B, C, 2) and idx.dtype == torch.int64
    assert_zero_grads(grads_of([out], (values,)), (values,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, Hq, T, M, k", [(0, 2, 3, 5, 2), (1, 0, 3, 5, 2), (1, 2, 0, 5, 2), (1, 2, 3, 0, 2),
                                            (1, 2, 3, 5, 0)])
def test_knn_search(backend, B, Hq, T, M, k):
    scores, idx = knn_search(torch.randn(B, Hq, T, 8), torch.randn(B, 1, M, 8), k, backend=backend)
    assert scores.shape == idx.shape == (B, Hq, T, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    assert bool((scores == float("-inf")).all()) and bool((idx == -1).all())  # M = 0: every result missing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, T, C, k", [(0, 3, 5, 2), (1, 0, 5, 2), (1, 3, 0, 2), (1, 3, 5, 0)])
def test_memory_attention(backend, B, T, C, k):
    q, mk, mv = leaf(B, 2, T, 8), leaf(B, 1, C, 8), leaf(B, 1, C, 6)
    idx = torch.randint(0, C, (B, 2, T, k)) if C else torch.full((B, 2, T, k), -1)
    out, lse = memory_attention(q, mk, mv, idx, backend=backend)
    assert out.shape == (B, 2, T, 6) and lse.shape == (B, 2, T) and lse.dtype == torch.float32
    assert not bool(out.any()) and bool((lse == float("-inf")).all())  # empty queries: out 0, lse -inf
    assert_zero_grads(grads_of([out, lse], (q, mk, mv)), (q, mk, mv))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, Hq, T, P", [(0, 2, 3, 0), (1, 0, 3, 2), (1, 2, 0, 0), (1, 2, 0, 4)])
def test_local_attention(backend, B, Hq, T, P):
    q, k, v = leaf(B, Hq, T, 8), leaf(B, 1, P + T, 8), leaf(B, 1, P + T, 6)
    out, lse = local_attention(q, k, v, backend=backend)
    assert out.shape == (B, Hq, T, 6) and lse.shape == (B, Hq, T)
    assert_zero_grads(grads_of([out, lse], (q, k, v)), (q, k, v))


def test_empty_results_pass_no_nan_into_gradients():
    """The link to the inputs adds exactly 0, even when the inputs hold NaN or inf."""
    q = torch.full((1, 2, 3, 8), float("nan"), requires_grad=True)
    mk, mv = torch.full((1, 1, 4, 8), float("inf"), requires_grad=True), leaf(1, 1, 4, 8)
    out, lse = memory_attention(q, mk, mv, torch.zeros(1, 2, 3, 0, dtype=torch.long), backend="torch")
    assert not bool(out.isnan().any()) and bool((lse == float("-inf")).all())
    out.sum().backward()
    assert not bool(q.grad.any()) and not bool(mk.grad.any())
