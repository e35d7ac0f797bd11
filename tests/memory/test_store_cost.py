"""KNNMemory's search cost follows what is stored (issue 12) and decode reads nothing back from the
device (issue 13)."""
import pytest
import torch

import memlayers as ml
from memlayers.ops.knn_search import knn_search


def _full_scan(mem, q, k):
    """The reference: exact search over the whole capacity, invalid slots masked by count."""
    return knn_search(q, mem.keys, k, valid_lengths=mem.count, metric=mem.metric, backend="torch")


@pytest.fixture
def scanned(monkeypatch):
    """Records the number of slots each exact search scans."""
    from memlayers.memory import store

    seen = []
    real = store.knn_search

    def spy(q, keys, *args, **kwargs):
        seen.append(keys.shape[2])
        return real(q, keys, *args, **kwargs)

    monkeypatch.setattr(store, "knn_search", spy)
    return seen


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_search_scans_the_filled_prefix_and_equals_a_full_scan(stream, scanned, metric):
    mem = ml.KNNMemory(3, 2, 16, capacity=200, metric=metric, backend="torch")
    q = torch.randn(3, 4, 5, 16)
    steps = [(7, 7), (30, 37), (60, 97)]  # (added, filled after)
    for T, filled in steps:
        stream(mem, steps=1, T=T)
        res = mem.search(q, 9)
        ref_s, ref_i = _full_scan(mem, q, 9)
        assert mem.filled == filled and scanned[-1] == filled
        # Another GEMV shape may round the last bit differently: scores to fp32 accuracy.
        assert torch.equal(res.indices, ref_i) and torch.allclose(res.scores, ref_s, rtol=1e-5, atol=1e-5)
    mem.reset([0, 2])
    assert mem.filled == 97  # row 1 still holds 97
    mem.reset(1)
    assert mem.filled == 0
    calls = len(scanned)
    res = mem.search(q, 9)
    assert len(scanned) == calls, "an empty memory needs no search"
    assert bool((res.indices == -1).all()) and bool(torch.isinf(res.scores).all())
    stream(mem, steps=1, T=250)  # more than the capacity: the ring is full
    assert mem.filled == 200
    res = mem.search(q, 9)
    assert scanned[-1] == 200 and torch.equal(res.indices, _full_scan(mem, q, 9)[1])


def test_filled_after_partial_reset_load_and_bind(stream):
    mem = ml.KNNMemory(2, 1, 8, capacity=50)
    stream(mem, steps=1, T=20)
    mem.reset([1])
    stream(mem, steps=1, T=5)
    assert mem.count.tolist() == [25, 5] and mem.filled == 25
    other = ml.KNNMemory(1, 1, 8, capacity=9)
    other.load_state_dict(mem.state_dict())
    assert other.filled == 25
    q = torch.randn(2, 1, 3, 8)
    assert torch.equal(other.search(q, 4).indices, _full_scan(mem, q, 4)[1])
    other.bind_batch(3)
    assert other.filled == 0


def test_rows_of_equal_count_mask_no_slot(stream, monkeypatch):
    """Rows that hold the same count search their prefix unmasked; once they differ (a partial reset,
    a load of unequal rows) the short rows' slots past their count are masked again, and every search
    equals a full scan."""
    from memlayers.memory import store

    lengths = []
    real = store.knn_search

    def spy(q, keys, k, valid_lengths=None, **kwargs):
        lengths.append(valid_lengths)
        return real(q, keys, k, valid_lengths=valid_lengths, **kwargs)

    monkeypatch.setattr(store, "knn_search", spy)
    mem = ml.KNNMemory(2, 2, 8, capacity=40, backend="torch")
    q = torch.randn(2, 4, 3, 8)
    stream(mem, steps=2, T=15)  # 30 tokens per row
    assert torch.equal(mem.search(q, 6).indices, _full_scan(mem, q, 6)[1]) and lengths[-1] is None
    mem.reset([0])
    stream(mem, steps=1, T=4)  # rows hold 4 and 34: row 0's slots 4..33 are zeros, never matches
    assert torch.equal(mem.search(q, 6).indices, _full_scan(mem, q, 6)[1]) and lengths[-1] is not None
    other = ml.KNNMemory(2, 2, 8, capacity=40, backend="torch")
    other.load_state_dict(mem.state_dict())
    assert torch.equal(other.search(q, 6).indices, _full_scan(mem, q, 6)[1]) and lengths[-1] is not None
    stream(other, steps=2, T=20)  # both rows wrap to the full capacity: equal again after the next reset
    other.reset([0, 1])
    stream(other, steps=1, T=5)
    assert torch.equal(other.search(q, 6).indices, _full_scan(other, q, 6)[1]) and lengths[-1] is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_step_reads_nothing_back(stream, host_reads, backend):
    mem = ml.KNNMemory(2, 2, 16, capacity=64, backend=backend, validate=False)
    stream(mem, steps=2, T=40)  # wraps
    host_reads.clear()
    for _ in range(3):  # a decode step: write the new token, search with its query
        mem.add(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
        mem.search(torch.randn(2, 4, 1, 16), k=8)
        mem.search(torch.randn(2, 4, 1, 16), k=8, gather=False)
    assert host_reads == []


def test_validate_is_the_only_read_on_add(stream, host_reads):
    mem = ml.KNNMemory(2, 2, 16, capacity=64, backend="torch")
    host_reads.clear()
    mem.add(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16))
    assert host_reads == ["tolist"]  # keys and values finite: one read
    mem.add(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), torch.arange(3, 6))
    assert host_reads == ["tolist"] * 2  # and explicit positions non-negative: one read still
    mem.search(torch.randn(2, 4, 1, 16), k=8)
    assert host_reads == ["tolist"] * 2


def test_validate_switch(stream):
    checked = ml.KNNMemory(1, 1, 4, capacity=8)
    with pytest.raises(ValueError, match="keys"):
        checked.add(torch.full((1, 1, 2, 4), float("nan")), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="values"):
        checked.add(torch.zeros(1, 1, 2, 4), torch.tensor([1.0, float("inf")]).expand(1, 1, 4, 2).mT)
    with pytest.raises(ValueError, match="positions"):
        checked.add(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), torch.tensor([3, -1]))
    assert checked.count.tolist() == [0]
    # Finite values whose sum overflows: the elementwise check clears them.
    checked.add(torch.full((1, 1, 2, 4), 3e38), torch.full((1, 1, 2, 4), -3e38))
    half = ml.KNNMemory(1, 1, 4, capacity=8, dtype=torch.float16)
    half.add(torch.full((1, 1, 2, 4), 60000.0, dtype=torch.float16), torch.zeros(1, 1, 2, 4, dtype=torch.float16))
    assert checked.count.tolist() == [2] and half.count.tolist() == [2]
    trusting = ml.KNNMemory(1, 1, 4, capacity=8, validate=False)
    trusting.add(torch.full((1, 1, 2, 4), float("nan")), torch.zeros(1, 1, 2, 4))  # the caller's promise
    assert trusting.count.tolist() == [2] and trusting.config()["validate"] is False
    with pytest.raises(TypeError, match="validate"):
        ml.KNNMemory(1, 1, 4, validate=1)


def test_a_non_finite_query_changes_nothing(stream):
    mem = ml.KNNMemory(2, 1, 8, capacity=20, backend="torch")
    stream(mem, steps=2, T=6)
    before = {n: b.clone() for n, b in mem.named_buffers()}
    q = torch.randn(2, 1, 3, 8)
    q[0, 0, 1, 2] = float("nan")
    res = mem.search(q, 4)
    for n, b in mem.named_buffers():
        assert torch.equal(before[n], b), n
    # The other queries' results are unaffected by their neighbour's NaN.
    clean = mem.search(q[:, :, [0, 2]], 4)
    assert torch.equal(res.indices[:, :, [0, 2]], clean.indices)
