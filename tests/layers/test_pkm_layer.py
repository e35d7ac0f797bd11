"""ProductKeyMemory: product-key top-k equals the exhaustive top-k; Memory+ switches; backends; errors."""
import pytest
import torch
import torch.nn.functional as F

from memlayers.layers.pkm import ProductKeyMemory


def exhaustive_read(pkm, x):
    """Score all n * n product keys explicitly, take the top-k, softmax, weighted sum over heads."""
    T = x.shape[0]
    H, n, half = pkm.heads, pkm.num_keys, pkm.key_dim // 2
    q = pkm.query(x).view(T, H, 2, half)
    s = torch.einsum("thsd,hsnd->thsn", q, pkm.keys)
    full = (s[:, :, 0, :, None] + s[:, :, 1, None, :]).reshape(T, H, n * n)
    best, idx = full.topk(pkm.top_k, dim=-1)
    w = torch.softmax(best, dim=-1)
    return (w[..., None] * pkm.values[idx]).sum(dim=(1, 2)), idx


def test_product_topk_equals_exhaustive_topk():
    pkm = ProductKeyMemory(dim=24, heads=3, num_keys=16, top_k=5, key_dim=12, backend="torch")
    x = torch.randn(30, 24)
    idx, w = pkm.address(x)
    ref, ref_idx = exhaustive_read(pkm, x)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    torch.testing.assert_close(pkm(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(30, 3))


def test_gradients_reach_query_keys_and_only_hit_values():
    pkm = ProductKeyMemory(dim=16, heads=2, num_keys=8, top_k=3, backend="torch")
    x = torch.randn(4, 16)
    pkm(x).square().sum().backward()
    idx, _ = pkm.address(x)
    hit = torch.zeros(64, dtype=torch.bool)
    hit[idx.reshape(-1)] = True
    assert bool((pkm.values.grad[~hit] == 0).all()) and bool((pkm.values.grad[hit] != 0).any())
    assert pkm.query.weight.grad.abs().sum() > 0 and pkm.keys.grad.abs().sum() > 0


def test_memory_plus_switches():
    base = ProductKeyMemory(dim=16, heads=2, num_keys=8, top_k=4, value_dim=32, gated=True, qk_norm=True, backend="torch")
    shared = ProductKeyMemory(dim=16, heads=2, num_keys=8, top_k=4, value_dim=32, shared_values=base, backend="torch")
    assert shared.values is base.values
    model = torch.nn.Sequential(base, shared)
    assert len(list(model.parameters())) == len(list(base.parameters())) + len(list(shared.parameters())) - 1
    x = torch.randn(2, 5, 16)
    assert model(x).shape == (2, 5, 16)
    # Gated read: out_proj(read * silu(gate(x))).
    flat = x.reshape(-1, 16)
    idx, w = base.address(flat)
    read = (w[..., None] * base.values[idx]).sum(dim=(1, 2))
    want = base.out_proj(read * F.silu(base.gate(flat)))
    torch.testing.assert_close(base(x).reshape(-1, 16), want, rtol=1e-5, atol=1e-5)
    # qk_norm: scores are cosines, so scaling the query projection changes neither indices nor weights.
    with torch.no_grad():
        base.query.weight.mul_(10.0)
    idx10, w10 = base.address(flat)
    assert torch.equal(idx10, idx)
    torch.testing.assert_close(w10, w)


def test_triton_backend_matches_torch():
    torch.manual_seed(0)
    a = ProductKeyMemory(dim=20, heads=2, num_keys=10, top_k=3, value_dim=18, backend="torch")
    b = ProductKeyMemory(dim=20, heads=2, num_keys=10, top_k=3, value_dim=18, backend="triton")
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, 20)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    ya.sum().backward()
    yb.sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_inputs():
    with pytest.raises(ValueError, match="top_k"):
        ProductKeyMemory(dim=8, num_keys=4, top_k=5)
    with pytest.raises(ValueError, match="key_dim must be even"):
        ProductKeyMemory(dim=8, num_keys=4, top_k=2, key_dim=5)
    with pytest.raises(TypeError, match="heads"):
        ProductKeyMemory(dim=8, heads=2.0, num_keys=4, top_k=2)
    with pytest.raises(ValueError, match="shared_values"):
        ProductKeyMemory(dim=8, num_keys=4, top_k=2, shared_values=torch.nn.Parameter(torch.zeros(15, 8)))
    with pytest.raises(TypeError, match="shared_values"):
        ProductKeyMemory(dim=8, num_keys=4, top_k=2, shared_values=torch.zeros(16, 8))
    pkm = ProductKeyMemory(dim=8, num_keys=4, top_k=2, backend="torch")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        pkm(torch.randn(3, 9))
    with pytest.raises(TypeError, match="x must have dtype"):
        pkm(torch.ones(3, 8, dtype=torch.int64))


def test_old_topk_name_warns_and_still_works():
    with pytest.warns(DeprecationWarning, match="topk"):
        pkm = ProductKeyMemory(dim=8, num_keys=4, topk=3, backend="torch")
    assert pkm.top_k == 3
    with pytest.warns(DeprecationWarning, match="topk"):
        assert pkm.topk == 3


def test_learned_memories_are_found_by_the_walk_and_have_no_row_state():
    from memlayers.layers.dkvb import DiscreteKeyValueBottleneck
    from memlayers.memory.protocol import memory_modules

    model = torch.nn.Sequential(ProductKeyMemory(dim=8, num_keys=4, top_k=2, backend="torch"),
                                DiscreteKeyValueBottleneck(8, 2, 16, key_dim=2, backend="torch"))
    assert [name for name, _ in memory_modules(model)] == ["0", "1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _, m in memory_modules(model):
        m.bind_batch(3)
        m.reset_memory([0])
        assert m.memory_batch_size is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="batch_size"):
        model[0].bind_batch(0)
