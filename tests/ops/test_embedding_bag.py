"""weighted_embedding_bag: Triton kernel vs torch.nn.functional.embedding_bag (forward and both gradients)."""
import pytest
import torch
import torch.nn.functional as F

from memlayers.ops.embedding_bag import weighted_embedding_bag
from memlayers.ops.utils.testing import TOLERANCE, assert_rel_close, poison_


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty during the test is NaN-filled, so kernel outputs left unwritten fail the checks."""
    original = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(original(*a, **k)))


def reference(weight, indices, psw):
    return F.embedding_bag(indices, weight.float(), per_sample_weights=psw.float(), mode="sum")


def make(V, D, T, K, dtype, device, hot=False):
    weight = torch.randn(V, D, device=device).to(dtype).requires_grad_()
    indices = torch.randint(0, V, (T, K), device=device)
    if hot:  # one row hit by most lookups: the segment reduction must not serialize or lose any
        indices[:, : max(1, K - 1)] = 3
    psw = torch.rand(T, K, device=device).to(dtype).requires_grad_()
    return weight, indices, psw


@pytest.mark.parametrize(
    "V,D,T,K,hot",
    [(7, 16, 1, 1, False), (50, 80, 63, 5, False), (300, 128, 100, 7, False), (20, 33, 40, 6, True)],
)
def test_triton_matches_embedding_bag_fp32(device, V, D, T, K, hot, poisoned_empty):
    weight, indices, psw = make(V, D, T, K, torch.float32, device, hot)
    out = weighted_embedding_bag(weight, indices, psw, backend="triton")
    ref = reference(weight, indices, psw)
    assert_rel_close(out, ref, TOLERANCE[torch.float32], "out")
    grad = torch.randn_like(ref)
    gw, gp = torch.autograd.grad(out, (weight, psw), grad)
    rw, rp = torch.autograd.grad(ref, (weight, psw), grad)
    assert_rel_close(gw, rw, TOLERANCE[torch.float32], "grad weight")
    assert_rel_close(gp, rp, TOLERANCE[torch.float32], "grad per_sample_weights")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(device, dtype, poisoned_empty):
    weight, indices, psw = make(64, 48, 33, 4, dtype, device)
    out = weighted_embedding_bag(weight, indices, psw, backend="triton")
    assert out.dtype == dtype
    ref = reference(weight, indices, psw)
    assert_rel_close(out, ref, TOLERANCE[dtype], "out")
    grad = torch.randn_like(ref)
    gw, gp = torch.autograd.grad(out, (weight, psw), grad.to(dtype))
    rw, rp = torch.autograd.grad(ref, (weight, psw), grad)
    assert_rel_close(gw, rw, TOLERANCE[dtype], "grad weight")
    assert_rel_close(gp, rp, TOLERANCE[dtype], "grad per_sample_weights")


def test_backward_is_deterministic_and_touches_only_hit_rows(device):
    weight, indices, psw = make(200, 32, 50, 6, torch.float32, device, hot=True)
    out = weighted_embedding_bag(weight, indices, psw, backend="triton")
    grad = torch.randn_like(out)
    g1 = torch.autograd.grad(out, weight, grad, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, weight, grad)[0]
    assert torch.equal(g1, g2)
    hit = torch.zeros(200, dtype=torch.bool, device=device)
    hit[indices.reshape(-1)] = True
    assert bool((g1[~hit] == 0).all())
    assert bool((g1[hit].abs().sum(-1) > 0).all())


def test_weights_gradient_only_when_needed(device, monkeypatch):
    from memlayers.ops.embedding_bag import triton as tri

    calls = []
    original = tri.embedding_bag_psw_grad
    monkeypatch.setattr(tri, "embedding_bag_psw_grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    weight, indices, psw = make(30, 16, 9, 3, torch.float32, device)
    out = weighted_embedding_bag(weight, indices, psw.detach(), backend="triton")
    out.sum().backward()
    assert calls == [] and weight.grad is not None
    out = weighted_embedding_bag(weight, indices, psw, backend="triton")
    out.sum().backward()
    assert calls == [1] and psw.grad is not None


def test_atomic_variant_matches(device):
    from memlayers.ops.embedding_bag.triton import embedding_bag_weight_grad

    _, indices, psw = make(40, 24, 17, 5, torch.float32, device)
    grad = torch.randn(17, 24, device=device)
    det = embedding_bag_weight_grad(grad, indices, psw.detach(), 40, deterministic=True)
    atomic = embedding_bag_weight_grad(grad, indices, psw.detach(), 40, deterministic=False)
    assert_rel_close(atomic, det, TOLERANCE[torch.float32], "atomic grad")


def test_torch_path_matches_reference():
    weight, indices, psw = make(100, 20, 30, 4, torch.float32, "cpu")
    out = weighted_embedding_bag(weight, indices.int(), psw, backend="torch")
    manual = (weight[indices] * psw[..., None]).sum(1)
    assert_rel_close(out, manual, 1e-6, "torch path")


def test_bad_inputs():
    weight, indices, psw = make(10, 8, 4, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="weight"):
        weighted_embedding_bag(weight[0], indices, psw)
    with pytest.raises(TypeError, match="indices"):
        weighted_embedding_bag(weight, indices.float(), psw)
    with pytest.raises(ValueError, match="per_sample_weights"):
        weighted_embedding_bag(weight, indices, psw[:, :2])
    with pytest.raises(TypeError, match="per_sample_weights"):
        weighted_embedding_bag(weight, indices, psw.double())
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        weighted_embedding_bag(weight, indices + 10, psw)
    with pytest.raises(ValueError, match="indices must lie"):
        weighted_embedding_bag(weight, indices - 5, psw)


@pytest.mark.gpu
def test_large_gpu_matches_embedding_bag():
    weight, indices, psw = make(1 << 16, 1024, 4096, 32, torch.bfloat16, "cuda")
    out = weighted_embedding_bag(weight, indices, psw, backend="triton")
    ref = reference(weight, indices, psw)
    assert_rel_close(out, ref, TOLERANCE[torch.bfloat16], "out")
    grad = torch.randn_like(ref)
    gw, gp = torch.autograd.grad(out, (weight, psw), grad.bfloat16())
    rw, rp = torch.autograd.grad(ref, (weight, psw), grad)
    assert_rel_close(gw, rw, TOLERANCE[torch.bfloat16], "grad weight")
    assert_rel_close(gp, rp, TOLERANCE[torch.bfloat16], "grad per_sample_weights")
