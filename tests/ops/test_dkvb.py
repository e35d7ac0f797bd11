"""dkvb_lookup: fused Triton kernel vs the naive path (forward, selected keys, value gradients)."""
import pytest
import torch

from memlayers.ops.dkvb import dkvb_distances, dkvb_lookup
from memlayers.ops.utils.testing import TOLERANCE, assert_rel_close, poison_


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty during the test is poisoned, so kernel outputs left unwritten fail the checks."""
    original = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(original(*a, **k)))


def make(B, C, N, Dk, Dv, device, dtype=torch.float32, value_dtype=None):
    q = torch.randn(B, C, Dk, device=device).to(dtype)
    keys = torch.randn(C, N, Dk, device=device).to(dtype)
    values = torch.randn(C, N, Dv, device=device).to(value_dtype or dtype).requires_grad_()
    return q, keys, values


def check_selection(q, keys, idx, ref_idx, key_mask=None):
    """Same keys, or (on a near tie) keys at the same distance: compare distances, not raw indices."""
    d = dkvb_distances(q, keys)  # [C, B, N]
    if key_mask is not None:
        assert bool(key_mask.gather(1, idx.permute(1, 0, 2).reshape(key_mask.shape[0], -1)).all()), "masked key selected"
    got = d.gather(2, idx.permute(1, 0, 2))
    want = d.gather(2, ref_idx.permute(1, 0, 2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    return bool((idx == ref_idx).float().mean() > 0.99)


@pytest.mark.parametrize(
    "B,C,N,Dk,Dv,k",
    [(1, 1, 16, 14, 10, 1), (37, 3, 100, 14, 10, 1), (20, 2, 130, 5, 16, 3), (9, 2, 70, 16, 3, 5)],
)
@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_matches_naive(device, B, C, N, Dk, Dv, k, deterministic, poisoned_empty):
    q, keys, values = make(B, C, N, Dk, Dv, device)
    out, idx = dkvb_lookup(q, keys, values, k, deterministic=deterministic, backend="triton")
    ref, ref_idx = dkvb_lookup(q, keys, values, k, backend="torch")
    assert check_selection(q, keys, idx, ref_idx)
    assert_rel_close(out, ref, TOLERANCE[torch.float32], "out")
    grad = torch.randn_like(ref)
    (gv,) = torch.autograd.grad(out, values, grad)
    (rv,) = torch.autograd.grad(ref, values, grad)
    assert_rel_close(gv, rv, TOLERANCE[torch.float32], "grad values")


def test_key_mask(device, poisoned_empty):
    q, keys, values = make(25, 3, 90, 6, 8, device)
    mask = torch.rand(3, 90, device=device) > 0.6
    out, idx = dkvb_lookup(q, keys, values, 2, key_mask=mask, backend="triton")
    ref, ref_idx = dkvb_lookup(q, keys, values, 2, key_mask=mask, backend="torch")
    assert check_selection(q, keys, idx, ref_idx, mask)
    assert_rel_close(out, ref, TOLERANCE[torch.float32], "out")


def test_half_precision_values(device):
    # fp32 search, bf16 values: the value fetch and its gradient run in bf16 storage, fp32 math.
    q, keys, values = make(30, 2, 64, 14, 10, device, value_dtype=torch.bfloat16)
    out, idx = dkvb_lookup(q, keys, values, 2, backend="triton")
    ref, ref_idx = dkvb_lookup(q, keys, values, 2, backend="torch")
    assert out.dtype == torch.bfloat16 and torch.equal(idx, ref_idx)
    assert_rel_close(out, ref, TOLERANCE[torch.bfloat16], "out")
    grad = torch.randn_like(ref)
    (gv,) = torch.autograd.grad(out, values, grad)
    (rv,) = torch.autograd.grad(ref, values, grad)
    assert_rel_close(gv, rv, TOLERANCE[torch.bfloat16], "grad values")


def test_only_fetched_values_get_gradient_and_deterministic_is_bitwise(device):
    q, keys, values = make(40, 2, 50, 4, 6, device)
    q[20:] = q[:20]  # repeated queries: rows fetched several times
    out, idx = dkvb_lookup(q, keys, values, 3, deterministic=True, backend="triton")
    grad = torch.randn_like(out)
    g1 = torch.autograd.grad(out, values, grad, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, values, grad)[0]
    assert torch.equal(g1, g2)
    hit = torch.zeros(2, 50, dtype=torch.bool, device=device)
    hit[torch.arange(2, device=device)[None, :, None].expand_as(idx), idx] = True
    assert bool((g1[~hit] == 0).all()) and bool((g1[hit].abs().sum(-1) > 0).all())


def test_nearest_key_is_exact_on_planted_data():
    # Each query is a key plus tiny noise: its nearest key must be that key, whatever the backend.
    keys = torch.randn(4, 300, 14)
    pick = torch.randint(0, 300, (50, 4))
    q = keys[torch.arange(4)[None, :], pick] + 1e-4 * torch.randn(50, 4, 14)
    values = torch.randn(4, 300, 10)
    _, idx = dkvb_lookup(q, keys, values, 1, backend="torch")
    assert torch.equal(idx[..., 0], pick)


def test_bad_inputs():
    q, keys, values = make(4, 2, 10, 3, 5, "cpu")
    with pytest.raises(ValueError, match="queries"):
        dkvb_lookup(q[0], keys, values)
    with pytest.raises(ValueError, match="keys"):
        dkvb_lookup(q, keys[:1], values)
    with pytest.raises(ValueError, match="keys"):
        dkvb_lookup(q, keys[..., :2], values)
    with pytest.raises(TypeError, match="keys"):
        dkvb_lookup(q, keys.double(), values)
    with pytest.raises(ValueError, match="values"):
        dkvb_lookup(q, keys, values[:, :5])
    with pytest.raises(TypeError, match="k must be an int"):
        dkvb_lookup(q, keys, values, k=1.0)
    with pytest.raises(ValueError, match="k must be <= the number of keys"):
        dkvb_lookup(q, keys, values, k=11)
    with pytest.raises(ValueError, match="key_mask"):
        dkvb_lookup(q, keys, values, key_mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_mask"):
        dkvb_lookup(q, keys, values, key_mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="key_mask must leave at least k=2"):
        dkvb_lookup(q, keys, values, k=2, key_mask=torch.eye(2, 10, dtype=torch.bool))


def test_old_keyword_topk_still_works_with_a_warning():
    q, keys, values = make(4, 2, 10, 3, 5, "cpu")
    out, idx = dkvb_lookup(q, keys, values, k=3, backend="torch")
    with pytest.warns(DeprecationWarning, match="topk= is renamed k="):
        old_out, old_idx = dkvb_lookup(q, keys, values, topk=3, backend="torch")
    assert torch.equal(old_idx, idx) and torch.equal(old_out, out)
    with pytest.raises(TypeError, match="both k= and its deprecated name topk="):
        dkvb_lookup(q, keys, values, k=2, topk=3)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 4])
def test_paper_scale_gpu(k):
    q, keys, values = make(256, 256, 4096, 14, 10, "cuda")
    out, idx = dkvb_lookup(q, keys, values, k, backend="triton")
    _, ref_idx = dkvb_lookup(q, keys, values, k, backend="torch")
    assert check_selection(q, keys, idx, ref_idx)
    # Near-ties may swap a selection among 65536: check the fetch against the kernel's own choice.
    codebook = torch.arange(256, device="cuda")[None, :, None]
    ref = values[codebook, idx].mean(2)
    assert_rel_close(out, ref, TOLERANCE[torch.float32], "out")
    grad = torch.randn_like(ref)
    (rv,) = torch.autograd.grad(ref, values, grad)
    for det in (False, True):
        out, _ = dkvb_lookup(q, keys, values, k, deterministic=det, backend="triton")
        (gv,) = torch.autograd.grad(out, values, grad)
        assert_rel_close(gv, rv, TOLERANCE[torch.float32], "grad values")
