"""Memories found by walking the model; Titans state in buffers with an exact per-row reset; saving
and loading memories (issue 14, classes 5 and 6): another model refused, nothing dropped silently,
a failed load leaves the model as it was."""
import copy
import json

import pytest
import torch

import memlayers.hf as mm
from memlayers.hf.state import installed
from memlayers.memory.protocol import memory_modules
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, logits, tiny_model


def _titans_model(family="llama", **cfg):
    model = tiny_model(family)
    mm.attach(model, mm.TitansMemoryConfig(layers=[0, 1], backend="torch", **cfg))
    with torch.no_grad():  # trained-looking gates: the memory's state shows in the logits
        for layer in model.model.layers:
            layer.titans_gate.fill_(0.5)
    return model


def test_no_side_object_memories_found_by_walking_and_detach_is_exact():
    model = tiny_model("qwen2")
    ids = torch.randint(1, VOCAB, (1, 30))
    before = logits(model, ids)
    originals = [layer.self_attn for layer in model.model.layers] + list(model.model.layers)
    mm.attach(model, [mm.KNNMemoryConfig(layers=[1], top_k=8, backend="torch"),
                      mm.TitansMemoryConfig(layers=[0, 1], chunk_size=16, backend="torch")])
    mm.attach(model, mm.DKVBConfig(layers=[1], num_codebooks=4, num_keys=16, key_dim=8, backend="torch"))
    assert not any(k.startswith("_memlayers") for k in model.__dict__)
    mm.memorize(model, ids[:, :20], chunk_size=8)
    kinds = sorted(type(m).__name__ for _, m in memory_modules(model))
    assert kinds == ["DiscreteKeyValueBottleneck", "KNNMemory", "StatefulNeuralMemory", "StatefulNeuralMemory"]
    # A deep copy carries its own memories: resetting the copy leaves the original's.
    twin = copy.deepcopy(model)
    mm.reset_memory(twin)
    assert model.model.layers[0].titans_memory.seen.tolist() == [20]
    assert twin.model.layers[0].titans_memory.seen.tolist() == [0]
    mm.detach(model)
    assert [layer.self_attn for layer in model.model.layers] + list(model.model.layers) == originals
    assert torch.equal(logits(model, ids), before)
    with pytest.raises(ValueError, match="no memory attached"):
        mm.detach(model)


@pytest.mark.parametrize("lengths", [(21, 10, 13), (16, 5, 7)])
def test_titans_row_reset_equals_a_fresh_model_that_memorized_only_the_new_text(lengths):
    la, lb, lc = lengths
    model = _titans_model(chunk_size=16)
    fresh = copy.deepcopy(model)
    ids = torch.randint(1, VOCAB, (2, la + lb + lc + 6))
    a, b, c, rest = (ids[:, :la], ids[:, la:la + lb], ids[:, la + lb:la + lb + lc], ids[:, la + lb + lc:])
    mm.memorize(model, a, chunk_size=8)
    mm.memorize(model, b, chunk_size=8)
    def row0():
        return {f"{i}.{n}": b[0].clone() for i, layer in enumerate(model.model.layers)
                for n, b in layer.titans_memory.named_buffers()}

    kept = row0()
    mm.reset_memory(model, rows=[1])
    assert all(torch.equal(v, kept[k]) for k, v in row0().items())  # row 0 untouched, bit for bit
    mm.memorize(model, c, chunk_size=8)
    mm.memorize(fresh, c[1:], chunk_size=8)
    for layer, ref in zip(model.model.layers, fresh.model.layers):
        for name, buf in ref.titans_memory.named_buffers():
            assert rel_err(getattr(layer.titans_memory, name)[1:], buf) < 1e-5 or torch.equal(
                getattr(layer.titans_memory, name)[1:], buf), name
    assert rel_err(logits(model, rest)[1:], logits(fresh, rest[1:])) < 1e-5


def test_save_pretrained_with_a_chunk_multiple_and_load_memory(tmp_path):
    # Default chunk_size (64): 64 memorized tokens leave nothing pending (once "tensors share memory").
    model = _titans_model()
    ids = torch.randint(1, VOCAB, (2, 70))
    mm.memorize(model, ids[:, :64], chunk_size=32)
    expected = logits(model, ids[:, 64:])
    mm.save_pretrained(model, tmp_path / "saved")
    assert (tmp_path / "saved" / "memlayers.safetensors").is_file()
    assert not [p.name for p in (tmp_path / "saved").iterdir() if p.name.endswith(".tmp")]
    target = tiny_model("llama")
    target.load_state_dict(model.state_dict(), strict=False)  # the plain weights (saved by transformers)
    mm.detach(model)
    target.load_state_dict(model.state_dict())
    mm.load_memory(target, tmp_path / "saved")
    assert torch.equal(logits(target, ids[:, 64:]), expected)
    assert target.model.layers[0].titans_memory.seen.tolist() == [64, 64]


def _saved(tmp_path, family="llama"):
    model = tiny_model(family)
    mm.attach(model, [mm.KNNMemoryConfig(layers=[1], top_k=8, backend="torch"),
                      mm.TitansMemoryConfig(layers=[0], chunk_size=16, backend="torch")])
    mm.memorize(model, torch.randint(1, VOCAB, (1, 20)), chunk_size=8)
    mm.save_pretrained(model, tmp_path / "saved")
    return tmp_path / "saved"


def _unchanged(model, ids, before):
    return not installed(model) and torch.equal(logits(model, ids), before)


def test_load_memory_refuses_another_model_family_and_leaves_the_model_as_it_was(tmp_path):
    saved = _saved(tmp_path, "llama")
    qwen = tiny_model("qwen2")  # the same shapes, another model type
    ids = torch.randint(1, VOCAB, (1, 10))
    before = logits(qwen, ids)
    with pytest.raises(ValueError, match="model_type"):
        mm.load_memory(qwen, saved)
    assert _unchanged(qwen, ids, before)
    wider = tiny_model("llama", hidden_size=96)
    with pytest.raises(ValueError, match="hidden_size"):
        mm.load_memory(wider, saved)


def test_load_memory_refuses_unclaimed_or_unfitting_tensors_and_a_retry_works(tmp_path):
    from safetensors.torch import load_file, save_file

    saved = _saved(tmp_path)
    path = saved / "memlayers.safetensors"
    good = load_file(str(path))
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 10))
    before = logits(model, ids)

    save_file(dict(good, **{"model.layers.5.extra": torch.zeros(3)}), str(path))
    with pytest.raises(ValueError, match="no attachment claims.*model.layers.5.extra"):
        mm.load_memory(model, saved)
    assert _unchanged(model, ids, before)

    key = next(k for k in good if k.endswith("titans_memory.weights_0"))
    save_file(dict(good, **{key: good[key][..., :-1].contiguous()}), str(path))
    with pytest.raises(ValueError, match="titans_memory"):
        mm.load_memory(model, saved)
    assert _unchanged(model, ids, before)

    meta = json.loads((saved / "memlayers.json").read_text())
    (saved / "memlayers.json").write_text("{not json")
    with pytest.raises(ValueError, match="memlayers.json"):
        mm.load_memory(model, saved)
    (saved / "memlayers.json").write_text(json.dumps(meta))

    save_file(good, str(path))  # the retry, with the files intact, works
    mm.load_memory(model, saved)
    assert model.model.layers[0].titans_memory.seen.tolist() == [20]
    assert model.model.layers[1].self_attn.memory.count.tolist() == [20]


def test_a_failed_save_leaves_no_checkpoint_without_its_memory_file(tmp_path, monkeypatch):
    model = _titans_model(chunk_size=16)
    mm.memorize(model, torch.randint(1, VOCAB, (1, 20)), chunk_size=8)

    def fail(*a, **k):
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        mm.save_pretrained(model, tmp_path / "saved")
    assert not (tmp_path / "saved").exists()  # failed before anything was written
    assert len(installed(model)) == 2  # still attached
    monkeypatch.undo()

    import memlayers.hf.persist as persist

    monkeypatch.setattr(persist, "_write_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        mm.save_pretrained(model, tmp_path / "saved2")
    assert not (tmp_path / "saved2" / "config.json").exists()  # no model checkpoint without its memories
    assert len(installed(model)) == 2


def test_knn_memory_files_hold_what_is_stored_and_files_saved_before_load(tmp_path):
    """A kNN store saves its filled slots and its capacity (issue 12); a memory file written before
    (every slot of the capacity, no capacity entry) loads into the same memory and model output."""
    from safetensors.torch import load_file, save_file

    plain = tiny_model("llama")
    model = copy.deepcopy(plain)
    mm.attach(model, mm.KNNMemoryConfig(layers=[1], top_k=8, backend="torch", capacity=300))
    ids = torch.randint(1, VOCAB, (2, 50))
    mm.memorize(model, ids[:, :40], chunk_size=16)
    expected = logits(model, ids[:, 40:])
    mem = model.model.layers[1].self_attn.memory
    assert mem.allocated_slots == 64 and mem.nbytes() < 300 * 2 * 2 * 16 * 4
    mm.save_pretrained(model, tmp_path / "saved")
    path = tmp_path / "saved" / "memlayers.safetensors"
    saved = load_file(str(path))
    prefix = "model.layers.1.self_attn.memory."
    assert saved[prefix + "keys"].shape[2] == 40 and int(saved[prefix + "capacity"]) == 300

    old = {k: v for k, v in saved.items() if k != prefix + "capacity"}
    for name, axis, empty in (("keys", 2, 0), ("values", 2, 0), ("positions", 1, -1)):
        t = old[prefix + name]
        shape = list(t.shape)
        shape[axis] = 300 - t.shape[axis]
        old[prefix + name] = torch.cat([t, t.new_full(shape, empty)], dim=axis)
    for layout, tensors in (("new", saved), ("old", old)):
        save_file(tensors, str(path))
        target = copy.deepcopy(plain)
        mm.load_memory(target, tmp_path / "saved")
        got = target.model.layers[1].self_attn.memory
        assert (got.capacity, got.allocated_slots, got.filled) == (300, 64, 40), layout
        for name, t in mem.state_dict().items():
            assert torch.equal(got.state_dict()[name], t), (layout, name)
        assert torch.equal(logits(target, ids[:, 40:]), expected), layout
