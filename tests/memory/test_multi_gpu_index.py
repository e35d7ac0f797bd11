"""FAISS indexes over several GPUs (``index_options={"gpus": [...], "multi_gpu": ...}``, issue 15).

Only faiss-cpu is installed here: the tests run the store's multi-GPU code path with the one step that
needs a GPU, ``index_cpu_to_gpu``, replaced by the CPU index itself, so the faiss ``IndexShards`` /
``IndexReplicas`` composites are built from CPU parts; everything else (ids, appends, rebuilds on
eviction, resets, training, persistence) is the code a GPU run executes.
"""
import copy

import faiss
import pytest
import torch

import memlayers as ml
from memlayers.memory import faiss_index

B, H, HQ, D, C, K = 2, 2, 4, 16, 97, 7  # odd capacity: the parts hold unequal shares


@pytest.fixture
def two_cpu_gpus(monkeypatch):
    monkeypatch.setattr(faiss_index, "_gpu_count", lambda faiss: 2)
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss_index.FaissIndexSet, "_to_gpu", lambda self, part, cpu_index: cpu_index)


def _assert_same(a, b):
    assert torch.equal(a.mask, b.mask) and torch.equal(a.indices, b.indices)
    assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.positions, b.positions) and torch.equal(a.values, b.values)


MODES = [("flat", "shard"), ("flat", "replicate"), ("ivf", "shard"), ("ivf", "replicate")]


@pytest.mark.parametrize("index, mode", MODES, ids=[f"{i}-{m}" for i, m in MODES])
def test_composite_index_equals_exact_search(two_cpu_gpus, index, mode):
    # IVF probing every list is exact; it trains once a row holds 40 vectors.
    opts = {"gpus": [0, 1], "multi_gpu": mode, **({"nlist": 4, "nprobe": 4, "train_size": 40} if index == "ivf" else {})}
    mem = ml.KNNMemory(B, H, D, capacity=C, index=index, index_options=opts)
    composite = mem._index.indexes[0][0]
    assert isinstance(composite, faiss.IndexShards if mode == "shard" else faiss.IndexReplicas)
    exact = ml.KNNMemory(B, H, D, capacity=C, backend="torch")
    torch.manual_seed(0)
    # Appends (several per index), a first search before IVF trains, wrap-around evictions, a row reset.
    for step, T in enumerate([5, 30, 1, 20, 60, 3, 150, 9]):
        keys, values = torch.randn(B, H, T, D), torch.randn(B, H, T, D)
        mem.add(keys, values)
        exact.add(keys, values)
        if step == 5:
            mem.reset([1])
            exact.reset([1])
        q = torch.randn(B, HQ, 3, D)
        _assert_same(mem.search(q, K), exact.search(q, K))
    parts = [composite.at(i) for i in range(composite.count())]
    if mode == "shard":  # each part holds a share of the vectors, together all of them, once
        assert 0 < parts[0].ntotal < C and parts[0].ntotal + parts[1].ntotal == C
    else:  # each replica holds every vector
        assert parts[0].ntotal == parts[1].ntotal == C

    # faiss cannot serialize the composites: no FAISS entries; loaded or copied memories rebuild them.
    state = mem.state_dict()
    assert not any(name.startswith("faiss.") for name in state)
    loaded = ml.KNNMemory(B, H, D, capacity=C, index=index, index_options=opts)
    loaded.load_state_dict(state)
    copied = copy.deepcopy(mem)
    q = torch.randn(B, HQ, 3, D)
    for other in (loaded, copied):
        _assert_same(other.search(q, K), exact.search(q, K))


def test_single_gpu_state_loads_into_a_composite(two_cpu_gpus):
    # A one-index memory's FAISS entries are not adopted by a composite: it rebuilds from the buffer.
    single = ml.KNNMemory(1, 1, D, capacity=C, index="flat")
    single.add(torch.randn(1, 1, 50, D), torch.randn(1, 1, 50, D))
    assert any(name.startswith("faiss.") for name in single.state_dict())
    multi = ml.KNNMemory(1, 1, D, capacity=C, index="flat", index_options={"gpus": [1, 0]})
    multi.load_state_dict(single.state_dict())
    q = torch.randn(1, 2, 4, D)
    _assert_same(multi.search(q, K), single.search(q, K))


@pytest.mark.parametrize(
    "options, exc, match",
    [
        ({"gpus": [0, 1]}, ValueError, "sees 0 GPU"),  # this faiss build has no GPUs
        ({"gpus": [0, 0]}, ValueError, "twice"),
        ({"gpus": []}, ValueError, "at least one"),
        ({"gpus": 0}, TypeError, "gpus"),
        ({"gpus": [-1]}, ValueError, "gpus"),
        ({"gpus": [0], "use_gpu": False}, ValueError, "use_gpu"),
        ({"gpus": [0, 1], "multi_gpu": "mirror"}, ValueError, "multi_gpu"),
    ],
)
def test_bad_gpu_options_fail_up_front(options, exc, match):
    with pytest.raises(exc, match=match):
        ml.KNNMemory(1, 1, D, capacity=C, index="ivf", index_options={"nlist": 4, **options})


def test_more_gpus_than_faiss_sees(monkeypatch):
    monkeypatch.setattr(faiss_index, "_gpu_count", lambda faiss: 2)
    with pytest.raises(ValueError, match=r"\[0, 2\].*sees 2 GPU"):
        ml.KNNMemory(1, 1, D, capacity=C, index="flat", index_options={"gpus": [0, 2]})


def test_hnsw_takes_no_gpus():
    with pytest.raises(ValueError, match="gpus"):
        ml.KNNMemory(1, 1, D, capacity=C, index="hnsw", index_options={"gpus": [0]})
