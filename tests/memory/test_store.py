"""KNNMemory: ring-buffer eviction, search backends, reset, persistence, bad input, soak."""
import os

import pytest
import torch

import memlayers as ml

pytest.importorskip("faiss")

BACKENDS = [
    dict(index="exact", backend="torch"),
    dict(index="exact", backend="triton"),
    dict(index="flat"),
    dict(index="ivf", index_options=dict(nlist=4, nprobe=4, train_size=40)),
    dict(index="hnsw"),
]
IDS = ["exact-torch", "exact-triton", "faiss-flat", "faiss-ivf", "faiss-hnsw"]


@pytest.mark.parametrize("opts", BACKENDS, ids=IDS)
def test_values_stay_paired_with_keys_after_wraparound(stream, opts):
    mem = ml.KNNMemory(2, 2, 16, 8, capacity=50, **opts)
    all_keys = stream(mem, steps=9, T=13)  # 117 tokens through 50 slots: wraps twice
    total = all_keys.shape[2]
    assert mem.count.tolist() == [50, 50] and mem.write_ptr.tolist() == [117 % 50] * 2
    q = torch.randn(2, 4, 6, 16)
    res = mem.search(q, k=10)
    assert bool(res.mask.all())
    ids = res.values[..., 0].long()  # [B, Hq, T, k]
    # Only the newest C tokens are retrievable, and each value came with the key that was retrieved.
    assert int(ids.min()) >= total - 50
    assert torch.equal(res.positions, ids)
    kv_head = torch.arange(4) // 2
    expected_keys = all_keys[torch.arange(2)[:, None, None, None], kv_head[None, :, None, None], ids]
    assert torch.equal(res.keys, expected_keys)
    # The slot ids index the buffers directly.
    assert torch.equal(mem.values[0, 0, res.indices[0, 0]][..., 0].long(), ids[0, 0])


@pytest.mark.parametrize("opts", BACKENDS[2:], ids=IDS[2:])
def test_faiss_matches_exact(opts):
    exact = ml.KNNMemory(2, 2, 32, capacity=300, backend="torch")
    other = ml.KNNMemory(2, 2, 32, capacity=300, **opts)
    for _ in range(5):
        keys, values = torch.randn(2, 2, 80, 32), torch.randn(2, 2, 80, 32)
        exact.add(keys, values)
        other.add(keys, values)
    q = torch.randn(2, 2, 20, 32)
    a, b = exact.search(q, 16), other.search(q, 16)
    if opts["index"] == "hnsw":  # approximate: high recall
        hits = (a.indices[..., None] == b.indices[..., None, :]).any(-1).float().mean().item()
        assert hits >= 0.9, hits
    else:  # flat, and IVF probing every list, are exact
        assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(a.indices, b.indices)


def test_ivf_before_training_searches_exactly(stream):
    exact = ml.KNNMemory(2, 2, 16, capacity=300, backend="torch")
    ivf = ml.KNNMemory(2, 2, 16, capacity=300, index="ivf", index_options=dict(nlist=4, train_size=200))
    torch.manual_seed(3)
    keys, values = torch.randn(2, 2, 70, 16), torch.randn(2, 2, 70, 16)
    exact.add(keys, values)
    ivf.add(keys, values)
    assert not ivf._index.indexes[0][0].is_trained
    q = torch.randn(2, 4, 5, 16)
    a, b = exact.search(q, 9), ivf.search(q, 9)
    assert torch.equal(a.indices, b.indices) and torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_faiss_flat_metrics_match_exact(metric):
    exact = ml.KNNMemory(1, 1, 16, capacity=64, metric=metric, backend="torch")
    flat = ml.KNNMemory(1, 1, 16, capacity=64, metric=metric, index="flat")
    keys = torch.randn(1, 1, 100, 16)
    exact.add(keys, keys)
    flat.add(keys, keys)
    q = torch.randn(1, 1, 7, 16)
    a, b = exact.search(q, 5), flat.search(q, 5)
    assert torch.equal(a.indices, b.indices)
    assert torch.allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


def test_partial_memory_marks_missing():
    mem = ml.KNNMemory(2, 1, 8, capacity=100, backend="torch")
    mem.add(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8))
    res = mem.search(torch.randn(2, 1, 2, 8), k=5)
    assert res.mask.sum(-1).tolist() == [[[3, 3]], [[3, 3]]]
    assert bool((res.indices[~res.mask] == -1).all()) and bool((res.positions[~res.mask] == -1).all())
    assert bool((res.values[~res.mask] == 0).all())


def test_add_longer_than_capacity_keeps_newest():
    mem = ml.KNNMemory(1, 1, 4, capacity=10, backend="torch")
    values = torch.arange(25, dtype=torch.float32).reshape(1, 1, 25, 1).expand(1, 1, 25, 4).contiguous()
    mem.add(torch.randn(1, 1, 25, 4), values)
    assert sorted(mem.values[0, 0, :, 0].long().tolist()) == list(range(15, 25))
    assert sorted(mem.positions[0].tolist()) == list(range(15, 25))
    assert mem.next_position.tolist() == [25]


def test_explicit_positions():
    mem = ml.KNNMemory(2, 1, 4, capacity=10, backend="torch")
    mem.add(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), positions=torch.tensor([[7, 8, 9], [100, 101, 102]]))
    assert mem.positions[:, :3].tolist() == [[7, 8, 9], [100, 101, 102]]
    assert mem.next_position.tolist() == [10, 103]
    mem.add(torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4))
    assert mem.positions[:, 3].tolist() == [10, 103]


@pytest.mark.parametrize("opts", [BACKENDS[0], BACKENDS[2], BACKENDS[4]], ids=["exact", "faiss-flat", "faiss-hnsw"])
def test_reset_rows_leaves_others_intact(stream, opts):
    mem = ml.KNNMemory(3, 2, 8, capacity=20, **opts)
    stream(mem, steps=3, T=9)
    before = {k: v.clone() for k, v in mem.state_dict().items() if not k.startswith("faiss")}
    q = torch.randn(3, 2, 4, 8)
    res_before = mem.search(q, 4)
    mem.reset(torch.tensor([1]))
    assert mem.count.tolist() == [20, 0, 20]
    for name in ("keys", "values", "positions"):
        assert torch.equal(getattr(mem, name)[[0, 2]], before[name][[0, 2]])
    res = mem.search(q, 4)
    assert bool((res.indices[1] == -1).all())
    assert torch.equal(res.indices[[0, 2]], res_before.indices[[0, 2]])
    mem.reset(torch.tensor([True, False, False]))
    assert mem.count.tolist() == [0, 0, 20]
    # A reset row fills again from slot 0 with positions from 0.
    stream(mem, steps=1, T=4)
    assert mem.count.tolist() == [4, 4, 20] and mem.positions[0, :4].tolist() == [0, 1, 2, 3]
    mem.reset()
    assert mem.count.tolist() == [0, 0, 0]


@pytest.mark.parametrize("opts", BACKENDS[:1] + BACKENDS[2:], ids=IDS[:1] + IDS[2:])
def test_save_load_round_trip_is_bit_exact(stream, opts, tmp_path):
    mem = ml.KNNMemory(2, 2, 16, 8, capacity=60, **opts)
    stream(mem, steps=7, T=11)
    mem.reset(torch.tensor([1]))
    stream(mem, steps=1, T=5)
    path = tmp_path / "mem.safetensors"
    mem.save(path)
    loaded = ml.KNNMemory.load(path)
    assert loaded.config() == mem.config()
    for (name, a), (_, b) in zip(mem.named_buffers(), loaded.named_buffers()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    q = torch.randn(2, 2, 5, 16)
    a, b = mem.search(q, 7), loaded.search(q, 7)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    # The loaded memory keeps streaming exactly like the original.
    keys, values = torch.randn(2, 2, 30, 16), torch.randn(2, 2, 30, 8)
    mem.add(keys, values)
    loaded.add(keys, values)
    a, b = mem.search(q, 7), loaded.search(q, 7)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)
    # state_dict into a fresh memory of the same configuration.
    fresh = ml.KNNMemory(2, 2, 16, 8, capacity=60, **opts)
    fresh.load_state_dict(mem.state_dict())
    c = fresh.search(q, 7)
    assert torch.equal(a.indices, c.indices) and torch.equal(a.scores, c.scores)


def test_cpu_keys_are_dim_major_and_stay_so(stream, tmp_path):
    # On CPU the keys buffer is a [B, H, C, D] view of a [B, H, D, C] buffer (fast exact decode search).
    mem = ml.KNNMemory(2, 2, 16, capacity=40)
    assert mem.keys.shape == (2, 2, 40, 16) and mem.keys.stride(-2) == 1
    stream(mem, steps=3, T=17)
    path = tmp_path / "mem.safetensors"
    mem.save(path)
    loaded = ml.KNNMemory.load(path)
    assert loaded.keys.stride(-2) == 1 and torch.equal(loaded.keys, mem.keys)
    half = mem.to(torch.float16)
    assert half.keys.stride(-2) == 1 and half.keys.dtype == torch.float16
    meta = ml.KNNMemory(1, 1, 8, capacity=5).to("meta")  # any non-CPU device: slot-major rows
    assert meta.keys.is_contiguous()


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="not a saved KNNMemory"):
        ml.KNNMemory.load(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_memory(dtype):
    mem = ml.KNNMemory(1, 2, 16, capacity=40, dtype=dtype, backend="torch")
    keys = torch.randn(1, 2, 30, 16, dtype=dtype)
    mem.add(keys, keys)
    res = mem.search(keys[:, :, :3], k=1)
    assert res.values.dtype == dtype
    assert res.indices[..., 0].tolist() == [[[0, 1, 2], [0, 1, 2]]] or bool(res.mask.all())


def _state(mem):
    return {k: v.clone() for k, v in mem.state_dict().items()}


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m.add(torch.randn(2, 2, 16), torch.randn(2, 2, 3, 8)), ValueError, "keys"),
        (lambda m: m.add(torch.randn(2, 3, 3, 16), torch.randn(2, 3, 3, 8)), ValueError, "keys"),
        (lambda m: m.add(torch.randn(2, 2, 3, 12), torch.randn(2, 2, 3, 8)), ValueError, "keys"),
        (lambda m: m.add(torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 8)), ValueError, "keys"),
        (lambda m: m.add(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 4, 8)), ValueError, "values"),
        (lambda m: m.add(torch.randn(2, 2, 3, 16).double(), torch.randn(2, 2, 3, 8)), TypeError, "keys"),
        (lambda m: m.add(torch.full((2, 2, 3, 16), float("nan")), torch.randn(2, 2, 3, 8)), ValueError, "keys"),
        (lambda m: m.add(torch.randn(2, 2, 3, 16), torch.full((2, 2, 3, 8), float("inf"))), ValueError, "values"),
        (lambda m: m.add(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 8), positions=torch.arange(4)), ValueError, "positions"),
        (lambda m: m.add(torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 8), positions=-torch.ones(3, dtype=torch.long)), ValueError, "positions"),
        (lambda m: m.search(torch.randn(2, 3, 1, 16), 2), ValueError, "multiple"),
        (lambda m: m.search(torch.randn(2, 2, 1, 16), 0), ValueError, "k"),
        (lambda m: m.search(torch.randn(2, 2, 1, 16).half(), 2), TypeError, "queries"),
        (lambda m: m.reset(torch.tensor([5])), ValueError, "rows"),
        (lambda m: m.reset(torch.tensor([True])), ValueError, "rows"),
        (lambda m: m.reset(torch.tensor([0.5])), TypeError, "rows"),
    ],
)
@pytest.mark.parametrize("opts", [BACKENDS[0], BACKENDS[2]], ids=["exact", "faiss"])
def test_bad_input_leaves_memory_unchanged(stream, call, exc, match, opts):
    mem = ml.KNNMemory(2, 2, 16, 8, capacity=20, **opts)
    stream(mem, steps=3, T=9)
    before = _state(mem)
    q = torch.randn(2, 2, 3, 16)
    res_before = mem.search(q, 5)
    with pytest.raises(exc, match=match):
        call(mem)
    after = _state(mem)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(mem.search(q, 5).indices, res_before.indices)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(batch_size=0, heads=1, dim=4), ValueError, "batch_size"),
        (dict(batch_size=1, heads=1, dim=300), ValueError, "dim"),
        (dict(batch_size=1, heads=1, dim=4, capacity=0), ValueError, "capacity"),
        (dict(batch_size=1, heads=1, dim=4, backend="annoy"), ValueError, "backend"),
        (dict(batch_size=1, heads=1, dim=4, index="annoy"), ValueError, "index"),
        (dict(batch_size=1, heads=1, dim=4, dtype=torch.float64), TypeError, "dtype"),
        (dict(batch_size=1, heads=1, dim=4, index="flat", index_options={"nlists": 3}), ValueError, "index_options"),
        (dict(batch_size=1, heads=1, dim=4, index="flat", index_options={"use_gpu": True}), ValueError, "GPU"),
    ],
)
def test_bad_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ml.KNNMemory(**kwargs)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
@pytest.mark.parametrize("opts", [dict(index="exact", backend="torch"), dict(index="flat")],
                         ids=["exact", "faiss-flat"])
def test_soak_no_memory_growth(opts):
    mem = ml.KNNMemory(2, 2, 32, capacity=256, **opts)
    keys, values, q = torch.randn(2, 2, 7, 32), torch.randn(2, 2, 7, 32), torch.randn(2, 4, 2, 32)

    def cycles(n):
        for i in range(n):
            mem.add(keys + i * 1e-3, values)
            mem.search(q, 8)
            if i % 500 == 499:
                mem.reset(torch.tensor([i % 2]))

    cycles(300)  # warm up allocators; the ring is full (the buffers grew to the capacity)
    assert mem.allocated_slots == 256
    ptrs = [b.data_ptr() for b in mem.buffers()]
    start = _rss_bytes()
    cycles(2000)
    growth = _rss_bytes() - start
    assert growth < 8 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 2000 add/search cycles"
    assert ptrs == [b.data_ptr() for b in mem.buffers()], "buffers were reallocated"


# ---------------------------------------------------------------- names (issue 11)
@pytest.mark.parametrize(
    "old, new",
    [
        (dict(backend="exact"), dict(index="exact", backend="auto")),
        (dict(backend="exact", index="flat", search_backend="torch"), dict(index="exact", backend="torch")),
        (dict(backend="faiss"), dict(index="flat", backend="auto")),
        (dict(backend="faiss", index="hnsw"), dict(index="hnsw", backend="auto")),
        (dict(search_backend="torch"), dict(index="exact", backend="torch")),
    ],
)
def test_old_names_still_work_with_a_deprecation_warning(old, new):
    with pytest.warns(DeprecationWarning, match="deprecated"):
        mem = ml.KNNMemory(1, 1, 8, capacity=10, **old)
    assert (mem.index, mem.backend) == (new["index"], new["backend"])
    assert mem.config()["index"] == new["index"] and "search_backend" not in mem.config()


def test_new_names_warn_nothing(recwarn):
    mem = ml.KNNMemory(1, 1, 8, capacity=10, index="flat", backend="torch")
    assert (mem.index, mem.backend) == ("flat", "torch")
    assert ml.KNNMemory(1, 1, 8, capacity=10).index == "exact"
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backend="faiss", index="exact"), "contradicts"),
        (dict(backend="torch", search_backend="triton"), "disagree"),
        (dict(backend="exact", search_backend="cuda"), "backend"),
    ],
)
def test_contradictory_old_and_new_names(kwargs, match):
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=match):
        ml.KNNMemory(1, 1, 8, capacity=10, **kwargs)


def test_native_backend_reaches_knn_search(monkeypatch):
    # backend names the compute backend of the exact search: it is what knn_search receives.
    from memlayers.memory import store

    seen = []
    real = store.knn_search

    def spy(*args, **kwargs):
        seen.append(kwargs["backend"])
        return real(*args, **{**kwargs, "backend": "torch"})

    monkeypatch.setattr(store, "knn_search", spy)
    mem = ml.KNNMemory(1, 1, 8, capacity=10, backend="native")
    mem.add(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8))
    mem.search(torch.randn(1, 1, 2, 8), k=2)
    assert seen == ["native"]


def test_file_saved_under_the_old_names_loads(stream, tmp_path):
    # A file written before the rename: config with backend="faiss"/"exact" and search_backend.
    import json

    from safetensors.torch import save_file

    for store_name, index, expect in [("exact", "flat", "exact"), ("faiss", "flat", "flat")]:
        mem = ml.KNNMemory(2, 1, 8, capacity=12, index=expect, backend="torch")
        stream(mem, steps=2, T=5)
        config = dict(mem.config(), backend=store_name, index=index, search_backend="torch")
        path = tmp_path / f"{store_name}.safetensors"
        tensors = {k: v.contiguous() for k, v in mem.state_dict().items()}
        save_file(tensors, str(path), metadata={"format": "memlayers.KNNMemory/1", "config": json.dumps(config)})
        loaded = ml.KNNMemory.load(path)
        assert (loaded.index, loaded.backend) == (expect, "torch")
        assert torch.equal(loaded.keys, mem.keys) and torch.equal(loaded.count, mem.count)


# ---------------------------------------------------------------- memory-state protocol (issue 11)
def test_knn_memory_is_a_memory_module():
    from memlayers.memory.protocol import MemoryModule, memory_modules

    mem = ml.KNNMemory(3, 1, 8, capacity=10)
    assert isinstance(mem, MemoryModule) and mem.memory_batch_size == 3
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), mem)
    assert [name for name, _ in memory_modules(model)] == ["1"]
    assert set(dict(model.named_buffers())) >= {"1.keys", "1.values", "1.count", "1.write_ptr"}


@pytest.mark.parametrize("opts", [BACKENDS[0], BACKENDS[2]], ids=["exact", "faiss"])
def test_reset_memory_is_reset(stream, opts):
    a = ml.KNNMemory(3, 2, 8, capacity=20, **opts)
    torch.manual_seed(0)
    stream(a, steps=2, T=7)
    b = ml.KNNMemory(3, 2, 8, capacity=20, **opts)
    b.load_state_dict(a.state_dict())
    a.reset(torch.tensor([False, True, True]))
    b.reset_memory([1, 2])
    assert a.count.tolist() == [14, 0, 0]
    for (name, x), (_, y) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("opts", [BACKENDS[0], BACKENDS[2]], ids=["exact", "faiss"])
def test_bind_batch_gives_empty_rows(stream, opts):
    mem = ml.KNNMemory(2, 2, 8, capacity=20, **opts)
    stream(mem, steps=2, T=5)
    mem.bind_batch(5)
    assert mem.memory_batch_size == 5 and mem.keys.shape == (5, 2, 20, 8) and mem.keys.stride(-2) == 1
    assert mem.count.tolist() == [0] * 5 and bool((mem.positions == -1).all())
    stream(mem, steps=1, T=3)
    res = mem.search(torch.randn(5, 2, 1, 8), k=4)
    assert res.mask.sum(-1).flatten().tolist() == [3] * 10
    with pytest.raises(ValueError, match="batch_size"):
        mem.bind_batch(0)
    assert mem.memory_batch_size == 5


@pytest.mark.parametrize("opts", [BACKENDS[0], BACKENDS[2], BACKENDS[3], BACKENDS[4]],
                         ids=["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
def test_load_state_dict_of_another_batch_size_and_capacity(stream, opts):
    src = ml.KNNMemory(3, 2, 16, 8, capacity=45, **opts)
    stream(src, steps=6, T=11)  # wraps
    dst = ml.KNNMemory(1, 2, 16, 8, capacity=41, **opts)
    dst.load_state_dict(src.state_dict())
    assert (dst.batch_size, dst.capacity) == (3, 45) and dst.keys.stride(-2) == 1
    for (name, x), (_, y) in zip(src.named_buffers(), dst.named_buffers()):
        assert torch.equal(x, y), name
    q = torch.randn(3, 4, 5, 16)
    a, b = src.search(q, 6), dst.search(q, 6)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.scores, b.scores)


def _corrupt(state, name, fn):
    state = {k: v.clone() for k, v in state.items()}
    state[name] = fn(state[name])
    return state


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda s: _corrupt(s, "count", lambda c: c + 100), "count"),
        (lambda s: _corrupt(s, "write_ptr", lambda w: w + 1), "write_ptr"),
        (lambda s: _corrupt(s, "positions", lambda p: p.fill_(-1)), "positions"),
        (lambda s: _corrupt(s, "keys", lambda k: k.index_put_((torch.tensor([0]),) * 4, torch.tensor(float("nan")))), "keys"),
        (lambda s: _corrupt(s, "values", lambda v: v[:, :, :, :3]), "values"),
        (lambda s: _corrupt(s, "keys", lambda k: k[:, :1]), "keys"),
        (lambda s: _corrupt(s, "count", lambda c: c[:1]), "count"),
        (lambda s: _corrupt(s, "count", lambda c: c.float()), "count"),
        (lambda s: {k: v for k, v in s.items() if k != "write_ptr"}, "write_ptr"),
    ],
)
def test_failed_load_state_dict_changes_nothing(stream, damage, match):
    # The state comes from a memory of another capacity and batch size: a failed load must not have
    # rebuilt, resized or partly written anything.
    src = ml.KNNMemory(3, 2, 16, 8, capacity=9, backend="torch")
    stream(src, steps=1, T=5)  # not full: write_ptr must equal count
    dst = ml.KNNMemory(2, 2, 16, 8, capacity=20, backend="torch")
    stream(dst, steps=3, T=9)
    before = _state(dst)
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(damage(src.state_dict()))
    assert (dst.batch_size, dst.capacity) == (2, 20)
    after = _state(dst)
    for k in before:
        assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("opts", BACKENDS[2:], ids=IDS[2:])
@pytest.mark.parametrize("foreign", ["other head", "other row", "other dim", "garbage", "missing"])
def test_load_state_dict_rejects_a_foreign_faiss_index(stream, opts, foreign):
    src = ml.KNNMemory(2, 2, 16, capacity=60, **opts)
    stream(src, steps=5, T=11)  # IVF trained, HNSW not stale (no eviction yet)
    state = dict(src.state_dict())
    if foreign == "other head":
        state["faiss.1.0"] = state["faiss.1.1"]
    elif foreign == "other row":
        state["faiss.1.0"] = state["faiss.0.0"]
    elif foreign == "other dim":
        state["faiss.1.0"] = ml.KNNMemory(1, 1, 8, capacity=60, **opts).state_dict()["faiss.0.0"]
    elif foreign == "garbage":
        state["faiss.1.0"] = torch.randint(0, 255, (100,), dtype=torch.uint8)
    else:
        del state["faiss.1.0"]
    dst = ml.KNNMemory(2, 2, 16, capacity=60, **opts)
    with pytest.raises(RuntimeError, match="faiss.1.0"):
        dst.load_state_dict(state)
    assert dst.count.tolist() == [0, 0] and all(i.ntotal == 0 for row in dst._index.indexes for i in row)
