"""DiscreteKeyValueBottleneck: splitters, decoders, key initialization, freezing, counts, masking, errors."""
import pytest
import torch
import torch.nn as nn

from memlayers.layers.dkvb import DiscreteKeyValueBottleneck
from memlayers.ops.dkvb import dkvb_distances


@torch.no_grad()
def quantization_error(dkvb, x):
    q = dkvb.split(x)
    return float(dkvb_distances(q, dkvb.keys).min(-1).values.add(q.pow(2).sum(-1).T).mean())


def clustered(n, dim, centers, gen=None):
    pick = torch.randint(0, len(centers), (n,), generator=gen)
    return centers[pick] + 0.05 * torch.randn(n, dim, generator=gen)


@pytest.mark.parametrize("splitter", ["chunk", "random", "learned"])
@pytest.mark.parametrize("decoder,shape", [("vote", (3, 5, 7)), ("mlp", (3, 5, 11)), ("none", (3, 5, 4, 7))])
def test_shapes(splitter, decoder, shape):
    dkvb = DiscreteKeyValueBottleneck(
        16, 4, 32, key_dim=4 if splitter != "chunk" else None, value_dim=7, top_k=2,
        splitter=splitter, decoder=decoder, out_dim=11, decoder_hidden=8, backend="torch",
    )
    y, info = dkvb(torch.randn(3, 5, 16), return_info=True)
    assert y.shape == shape
    assert info["indices"].shape == (3, 5, 4, 2) and info["queries"].shape == (3, 5, 4, 4)
    assert (info["commitment_loss"] is not None) == (splitter == "learned")


def test_chunk_splitter_slices_input():
    dkvb = DiscreteKeyValueBottleneck(6, 3, 8, splitter="chunk", value_dim=2, backend="torch")
    x = torch.arange(12.0).reshape(2, 6)
    assert torch.equal(dkvb.split(x), x.reshape(2, 3, 2))


def test_init_keys_fits_data_and_replaces_dead_keys():
    gen = torch.Generator().manual_seed(1)
    centers = torch.rand(12, 8, generator=gen) * 4
    dkvb = DiscreteKeyValueBottleneck(8, 2, 16, key_dim=8, value_dim=3, splitter="random", backend="torch")
    data = [clustered(256, 8, centers, gen) for _ in range(20)]
    before = quantization_error(dkvb, data[0])
    # Park half the keys far from any data: they must be detected as dead and moved onto data.
    dkvb.keys[:, :8] += 100.0
    dkvb.keys_initialized.fill_(True)
    stats = dkvb.init_keys(data, epochs=2)
    after = quantization_error(dkvb, data[0])
    assert stats["batches"] == 40 and stats["replaced"] >= 16
    assert after < 0.05 * before
    assert float(dkvb.keys.abs().max()) < 50.0
    assert bool(dkvb.keys_initialized)


def test_init_keys_from_scratch_seeds_from_data():
    gen = torch.Generator().manual_seed(2)
    centers = torch.rand(8, 4, generator=gen) * 3
    dkvb = DiscreteKeyValueBottleneck(4, 1, 16, key_dim=4, value_dim=2, splitter="learned", backend="torch")
    with torch.no_grad():
        dkvb.splitter.weight.copy_(torch.eye(4))
    data = [clustered(400, 4, centers, gen) for _ in range(5)]
    random_keys_error = quantization_error(dkvb, data[0])
    dkvb.init_keys(data)
    # 16 keys over 8 tight clusters (noise std 0.05, squared error ~0.01 per point when covered).
    assert quantization_error(dkvb, data[0]) < 0.02 < 0.1 * random_keys_error


def test_freeze_keys_blocks_init_and_failed_init_changes_nothing():
    dkvb = DiscreteKeyValueBottleneck(4, 2, 8, key_dim=2, value_dim=2, backend="torch")
    keys = dkvb.keys.clone()
    bad = torch.randn(16, 4)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"batches\[2\] contains non-finite"):
        dkvb.init_keys([torch.randn(16, 4), torch.randn(16, 4), bad])
    with pytest.raises(ValueError, match=r"batches\[1\] must have shape \[\.\.\., 4\]"):
        dkvb.init_keys([torch.randn(16, 4), torch.randn(16, 3)])
    with pytest.raises(ValueError, match="decay"):
        dkvb.init_keys([torch.randn(16, 4)], decay=1.0)
    assert torch.equal(dkvb.keys, keys) and not bool(dkvb.keys_initialized)
    dkvb.init_keys([(torch.randn(16, 4), torch.zeros(16))])  # (x, y) batches: x is used
    dkvb.freeze_keys()
    frozen = dkvb.keys.clone()
    with pytest.raises(RuntimeError, match="frozen"):
        dkvb.init_keys([torch.randn(16, 4)])
    assert torch.equal(dkvb.keys, frozen)
    assert "keys_frozen" in dkvb.state_dict()


def test_only_fetched_values_learn_and_counts_track_training():
    dkvb = DiscreteKeyValueBottleneck(4, 3, 20, key_dim=2, value_dim=5, backend="torch")
    x = torch.randn(6, 4)
    y, info = dkvb(x, return_info=True)
    y.sum().backward()
    hit = torch.zeros(3, 20, dtype=torch.bool)
    hit[torch.arange(3)[None, :], info["indices"][..., 0]] = True
    assert bool((dkvb.values.grad[~hit] == 0).all()) and bool((dkvb.values.grad[hit] != 0).any())
    assert int(dkvb.counts.sum()) == 6 * 3
    assert torch.equal(dkvb.counts > 0, hit)
    dkvb.eval()
    dkvb(torch.randn(5, 4))
    assert int(dkvb.counts.sum()) == 18  # evaluation does not count
    dkvb.reset_counts()
    assert int(dkvb.counts.sum()) == 0


def test_mask_untrained_searches_trained_pairs_only():
    torch.manual_seed(0)
    dkvb = DiscreteKeyValueBottleneck(2, 4, 30, key_dim=2, value_dim=3, mask_untrained=True, backend="torch")
    dkvb(torch.randn(10, 2))  # training forward: marks some pairs as trained
    trained = dkvb.counts > 0
    dkvb.eval()
    _, info = dkvb(torch.randn(200, 2) * 3, return_info=True)
    sel = info["indices"][..., 0]  # [200, C]
    assert bool(trained[torch.arange(4)[None, :], sel].all())
    dkvb.mask_untrained = False
    _, info = dkvb(torch.randn(200, 2) * 3, return_info=True)
    assert not bool(trained[torch.arange(4)[None, :], info["indices"][..., 0]].all())


def test_learned_splitter_gets_commitment_gradient_only():
    dkvb = DiscreteKeyValueBottleneck(8, 2, 16, key_dim=3, value_dim=4, splitter="learned", backend="torch")
    y, info = dkvb(torch.randn(5, 8), return_info=True)
    y.sum().backward()
    assert dkvb.splitter.weight.grad is None  # the key choice passes no gradient
    info["commitment_loss"].backward()
    assert dkvb.splitter.weight.grad.abs().sum() > 0


def test_custom_modules():
    splitter = nn.Linear(8, 6)
    decoder = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 4, 2))
    dkvb = DiscreteKeyValueBottleneck(8, 3, 10, key_dim=2, value_dim=4, splitter=splitter, decoder=decoder, backend="torch")
    assert dkvb(torch.randn(7, 8)).shape == (7, 2)


def test_triton_backend_matches_torch():
    torch.manual_seed(3)
    a = DiscreteKeyValueBottleneck(10, 3, 40, key_dim=5, value_dim=6, top_k=2, decoder="none", backend="torch")
    b = DiscreteKeyValueBottleneck(10, 3, 40, key_dim=5, value_dim=6, top_k=2, decoder="none", backend="triton")
    b.load_state_dict(a.state_dict())
    x = torch.randn(9, 10)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(yb, ya)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(b.values.grad, a.values.grad)
    assert torch.equal(a.counts, b.counts)


def test_bad_constructor_and_forward_inputs():
    with pytest.raises(ValueError, match="splitter"):
        DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, splitter="pca")
    with pytest.raises(ValueError, match="decoder"):
        DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, decoder="attention")
    with pytest.raises(ValueError, match="key_dim is required"):
        DiscreteKeyValueBottleneck(8, 2, 4)
    with pytest.raises(ValueError, match="divisible"):
        DiscreteKeyValueBottleneck(9, 2, 4, splitter="chunk")
    with pytest.raises(ValueError, match="top_k"):
        DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, top_k=5)
    with pytest.raises(ValueError, match="out_dim"):
        DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, decoder="mlp")
    with pytest.raises(TypeError, match="num_keys"):
        DiscreteKeyValueBottleneck(8, 2, 4.0, key_dim=2)
    dkvb = DiscreteKeyValueBottleneck(8, 2, 4, key_dim=2, backend="torch")
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 8\]"):
        dkvb(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must have dtype"):
        dkvb(torch.randint(0, 3, (3, 8)))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        dkvb([[0.0] * 8])
    bad = torch.randn(3, 8)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="x contains non-finite"):
        dkvb(bad)
    assert int(dkvb.counts.sum()) == 0  # the rejected call left the counts alone


def test_old_topk_name_warns_and_still_works():
    with pytest.warns(DeprecationWarning, match="topk"):
        layer = DiscreteKeyValueBottleneck(8, 2, 16, key_dim=2, topk=3, backend="torch")
    assert layer.top_k == 3
    with pytest.warns(DeprecationWarning, match="topk"):
        assert layer.topk == 3
