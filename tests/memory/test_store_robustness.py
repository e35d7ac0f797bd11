"""KNNMemory under hostile use (issue 14): row selectors, threads, index options, failed index writes,
damaged states and files, atomic and deterministic saves, copies."""
import copy
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import memlayers as ml

pytest.importorskip("faiss")

INDEXES = [dict(index="exact", backend="torch"), dict(index="flat"),
           dict(index="ivf", index_options=dict(nlist=4, nprobe=4, train_size=20)), dict(index="hnsw")]
INDEX_IDS = ["exact", "flat", "ivf", "hnsw"]


def _buffers(mem):
    return {name: b.clone() for name, b in mem.named_buffers()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---------------------------------------------------------------- class 1: row selectors
@pytest.mark.parametrize("verb", ["reset", "reset_memory"])
@pytest.mark.parametrize("rows, cleared", [([False, True, False], [1]), ((True, False, True), [0, 2]), ([2, -3], [0, 2]),
                                           (torch.tensor([False, False, True]), [2]), (1, [1]), ([], [])])
def test_row_selectors_mean_what_they_say(stream, verb, rows, cleared):
    mem = ml.KNNMemory(3, 1, 8, capacity=20)
    stream(mem, steps=2, T=5)
    getattr(mem, verb)(rows)
    assert mem.count.tolist() == [0 if b in cleared else 10 for b in range(3)]


@pytest.mark.parametrize("rows, exc", [([0.9], TypeError), ([True, 1], TypeError), ([False, True], ValueError),
                                       (torch.tensor([[0]]), ValueError), ([3], ValueError), (True, TypeError),
                                       ("0", TypeError)])
def test_bad_row_selectors_change_nothing(stream, rows, exc):
    mem = ml.KNNMemory(3, 1, 8, capacity=20)
    stream(mem, steps=2, T=5)
    before = _buffers(mem)
    with pytest.raises(exc, match="rows"):
        mem.reset(rows)
    _assert_same(before, _buffers(mem))


# ---------------------------------------------------------------- class 2: threads
def _run_threads(target, n, *args):
    errors = []

    def guarded(i):
        try:
            target(i, *args)
        except BaseException as e:  # a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _tagged(ids, B, H, D):
    """Keys and values whose every element encodes the token id: a pairing check reads it back."""
    x = ids.float()[None, None, :, None].expand(B, H, len(ids), D).contiguous()
    return x + 0.25, x  # key = id + 0.25, value = id


@pytest.mark.parametrize("opts", INDEXES, ids=INDEX_IDS)
def test_concurrent_adds_lose_nothing(opts):
    threads, chunks, T = 4, 30, 2
    mem = ml.KNNMemory(1, 2, 4, capacity=threads * chunks * T, **opts)

    def adder(i):
        for c in range(chunks):
            ids = torch.arange(T) + (i * chunks + c) * T
            mem.add(*_tagged(ids, 1, 2, 4))

    _run_threads(adder, threads)
    total = threads * chunks * T
    assert mem.count.tolist() == [total]
    assert sorted(mem.values[0, 0, :, 0].long().tolist()) == list(range(total))
    assert torch.equal(mem.keys - 0.25, mem.values)  # every key still sits with its value
    assert sorted(mem.positions[0].tolist()) == list(range(total))
    # The index is in step with the buffer: it finds every stored key as its own best match.
    res = mem.search(mem.keys[:, :, :, :].reshape(1, 2, total, 4)[:, :, :5], k=1)
    assert bool(res.mask.all())


@pytest.mark.parametrize("opts", INDEXES, ids=INDEX_IDS)
def test_concurrent_add_search_reset_save_stay_consistent(opts, tmp_path):
    mem = ml.KNNMemory(2, 1, 4, capacity=30, **opts)
    rounds = 15

    def worker(i):
        for r in range(rounds):
            if i == 0:
                mem.add(*_tagged(torch.arange(4) + 4 * r, 2, 1, 4))
            elif i == 1:
                res = mem.search(torch.randn(2, 1, 2, 4), k=5)
                # Whatever the interleaving, a result's key and value come from the same slot.
                assert torch.equal((res.keys - 0.25)[res.mask], res.values[res.mask])
            elif i == 2 and r % 5 == 4:
                mem.reset([r % 2])
            elif i == 3 and r % 5 == 0:
                path = tmp_path / f"mem{r}.safetensors"
                mem.save(path)
                ml.KNNMemory.load(path)  # a save taken mid-stream is a consistent state

    _run_threads(worker, 4)
    fresh = ml.KNNMemory(2, 1, 4, capacity=30, **opts)
    fresh.load_state_dict(mem.state_dict())  # the final state passes every load check


def test_the_lock_survives_copies():
    mem = ml.KNNMemory(1, 1, 4, capacity=8, index="flat")
    mem.add(torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
    twin = copy.deepcopy(mem)
    assert twin._lock is not mem._lock
    q = torch.randn(1, 1, 2, 4)
    assert torch.equal(twin.search(q, 2).indices, mem.search(q, 2).indices)
    twin.add(torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    assert (twin.count.tolist(), mem.count.tolist()) == ([4], [3])


# ---------------------------------------------------------------- class 4: index options
@pytest.mark.parametrize(
    "index, options, exc, match",
    [
        ("hnsw", dict(hnsw_m=0), ValueError, "hnsw_m"),
        ("hnsw", dict(hnsw_m=1), ValueError, "hnsw_m"),
        ("hnsw", dict(ef_search=0), ValueError, "ef_search"),
        ("hnsw", dict(ef_search=2.5), TypeError, "ef_search"),
        ("hnsw", dict(nlist=4), ValueError, "nlist"),
        ("hnsw", dict(use_gpu=True), ValueError, "use_gpu"),
        ("ivf", dict(nlist=0), ValueError, "nlist"),
        ("ivf", dict(nlist=8, nprobe=-1), ValueError, "nprobe"),
        ("ivf", dict(nlist=8, train_size=5), ValueError, "train_size"),
        ("ivf", dict(nlist=8, train_size=500), ValueError, "train_size"),
        ("ivf", dict(nlist=True), TypeError, "nlist"),
        ("ivf", dict(nlists=8), ValueError, "nlists"),
        ("flat", dict(nprobe=2), ValueError, "nprobe"),
        ("flat", dict(use_gpu="yes"), TypeError, "use_gpu"),
        ("flat", [("nlist", 2)], TypeError, "index_options"),
        ("exact", dict(nlist=8), ValueError, "index_options"),
    ],
)
def test_index_options_are_checked_up_front(index, options, exc, match):
    with pytest.raises(exc, match=match):
        ml.KNNMemory(1, 1, 8, capacity=100, index=index, index_options=options)


def test_ivf_default_train_size_fits_the_capacity(stream):
    mem = ml.KNNMemory(1, 1, 8, capacity=100, index="ivf", index_options=dict(nlist=4))
    assert mem.index_options["train_size"] == 100
    stream(mem, steps=1, T=100)
    assert mem._index.indexes[0][0].is_trained


def test_hnsw_returns_k_hits_whatever_ef_search(stream):
    mem = ml.KNNMemory(1, 1, 8, capacity=200, index="hnsw", index_options=dict(ef_search=1))
    stream(mem, steps=1, T=200)
    res = mem.search(torch.randn(1, 1, 6, 8), k=12)
    assert res.mask.sum(-1).flatten().tolist() == [12] * 6


@pytest.mark.parametrize("opts", INDEXES[1:], ids=INDEX_IDS[1:])
def test_add_is_never_half_written_when_the_index_fails(stream, opts, monkeypatch):
    from memlayers.memory.faiss_index import FaissIndexSet

    mem = ml.KNNMemory(2, 2, 8, capacity=50, **opts)
    reference = ml.KNNMemory(2, 2, 8, capacity=50, index="exact", backend="torch")
    torch.manual_seed(1)
    # Flat and IVF: the failing write evicts. HNSW: no eviction yet, so the write adds incrementally.
    steps = 3 if opts["index"] == "hnsw" else 6
    keys = stream(mem, steps=steps, T=11)
    values = mem.values.clone()
    reference.load_state_dict({k: v for k, v in mem.state_dict().items() if not k.startswith("faiss")})
    before = _buffers(mem)

    calls = {"n": 0}
    real_add = FaissIndexSet._add

    def failing_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # some indexes already changed, the others not
            raise RuntimeError("simulated FAISS failure")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(FaissIndexSet, "_add", failing_add)
    with pytest.raises(RuntimeError, match="simulated"):
        mem.add(torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8))
    monkeypatch.setattr(FaissIndexSet, "_add", real_add)
    _assert_same(before, _buffers(mem))
    q = torch.randn(2, 2, 4, 8)
    a, b = mem.search(q, 5), reference.search(q, 5)
    if opts["index"] == "hnsw":
        assert (a.indices[..., None] == b.indices[..., None, :]).any(-1).float().mean() >= 0.9
    else:
        assert torch.equal(a.indices, b.indices)
    assert keys.shape[2] == 11 * steps and torch.equal(values, mem.values)


# ---------------------------------------------------------------- class 5 and 8: files
def _saved(stream, tmp_path, **opts):
    mem = ml.KNNMemory(2, 2, 8, capacity=30, **opts)
    stream(mem, steps=4, T=9)
    path = tmp_path / "mem.safetensors"
    mem.save(path)
    return mem, path


def _rewrite(path, edit_tensors=None, edit_meta=None):
    """Rewrite a saved file with edited tensors or metadata (the checksum kept as it was)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        meta = edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def _resign(path):
    """Give an edited file a matching checksum, as a careful forger would: contents checks remain."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from memlayers.memory.files import checksum

    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["memlayers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info["sha256"] = checksum(tensors)
    save_file(tensors, str(path), metadata={"memlayers": json.dumps(info, sort_keys=True)})


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda t: t["count"].fill_(99), "count"),
        (lambda t: t["write_ptr"].fill_(30), "write_ptr"),
        (lambda t: t["keys"].view(-1)[5].fill_(float("nan")), "non-finite"),
        (lambda t: t["values"].view(-1)[0].fill_(float("inf")), "non-finite"),
        (lambda t: t.__setitem__("faiss.0.1", t["faiss.1.1"].clone()), "faiss.0.1"),
    ],
)
def test_load_checks_contents_and_names_the_file(stream, tmp_path, damage, match):
    _, path = _saved(stream, tmp_path, index="flat")
    _rewrite(path, edit_tensors=damage)
    _resign(path)
    with pytest.raises(ValueError, match=match) as info:
        ml.KNNMemory.load(path)
    assert str(path) in str(info.value)


def test_flipped_bytes_are_caught(stream, tmp_path):
    _, path = _saved(stream, tmp_path)
    data = bytearray(path.read_bytes())
    data[-37] ^= 0x10  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum") as info:
        ml.KNNMemory.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "metadata json", "metadata keys", "config"])
def test_damaged_files_give_one_clear_error(stream, tmp_path, damage):
    _, path = _saved(stream, tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "metadata json":
        _rewrite(path, edit_meta=lambda m: {"memlayers": m["memlayers"][:-3]})
    elif damage == "metadata keys":
        _rewrite(path, edit_meta=lambda m: {"memlayers": json.dumps({"format": "memlayers.KNNMemory/2"})})
    else:
        def bad_config(m):
            info = json.loads(m["memlayers"])
            info["config"]["dtype"] = "float77"
            return {"memlayers": json.dumps(info)}
        _rewrite(path, edit_meta=bad_config)
    with pytest.raises(ValueError) as info:
        ml.KNNMemory.load(path)
    assert str(path) in str(info.value)


def test_not_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        ml.KNNMemory.load(tmp_path / "nothing-here.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        ml.KNNMemory.load(tmp_path)
    if os.path.exists("/dev/null"):
        with pytest.raises(ValueError, match="/dev/null"):
            ml.KNNMemory.load("/dev/null")


@pytest.mark.parametrize("opts", INDEXES, ids=INDEX_IDS)
def test_same_memory_same_bytes(stream, tmp_path, opts):
    mem, path = _saved(stream, tmp_path, **opts)
    again = tmp_path / "again.safetensors"
    mem.save(again)
    assert path.read_bytes() == again.read_bytes()
    third = tmp_path / "third.safetensors"
    ml.KNNMemory.load(path).save(third)  # a loaded memory is the same memory
    assert path.read_bytes() == third.read_bytes()


def test_interrupted_save_leaves_nothing_and_keeps_the_old_file(stream, tmp_path, monkeypatch):
    import safetensors.torch

    mem, path = _saved(stream, tmp_path)
    old = path.read_bytes()
    real = safetensors.torch.save_file

    def killed(tensors, filename, metadata=None):
        real({"x": torch.zeros(1000)}, filename)  # part of the file written
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    stream(mem, steps=1, T=3)
    with pytest.raises(KeyboardInterrupt):
        mem.save(path)
    assert os.listdir(tmp_path) == ["mem.safetensors"] and path.read_bytes() == old


def test_a_killed_saves_partial_file_is_removed_by_the_next_save(stream, tmp_path):
    mem, path = _saved(stream, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"mem.safetensors.{int(dead.stdout)}.partial"  # visible, next to its target
    leftover.write_bytes(b"x" * 100)
    alive = tmp_path / f"mem.safetensors.{os.getppid()}.partial"  # another live process's save: kept
    alive.write_bytes(b"y")
    mem.save(path)
    assert sorted(os.listdir(tmp_path)) == sorted(["mem.safetensors", alive.name])


# ---------------------------------------------------------------- class 7: empty inputs
@pytest.mark.parametrize("opts", INDEXES, ids=INDEX_IDS)
def test_empty_inputs_give_empty_outputs(stream, opts):
    mem = ml.KNNMemory(2, 1, 4, 3, capacity=30, **opts)
    for _ in range(2):  # empty memory, then a filled one
        res = mem.search(torch.randn(2, 2, 0, 4), k=5)
        assert res.values.shape == (2, 2, 0, 5, 3) and res.indices.shape == (2, 2, 0, 5)
        before = {n: b.clone() for n, b in mem.named_buffers()}
        mem.add(torch.randn(2, 1, 0, 4), torch.randn(2, 1, 0, 3))
        _assert_same(before, {n: b.clone() for n, b in mem.named_buffers()})
        stream(mem, steps=1, T=25)
