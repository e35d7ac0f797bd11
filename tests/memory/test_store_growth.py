"""KNNMemory's storage grows with what is stored (issue 12): buffers start at 64 slots and double up to
the capacity, the ring and every result stay those of a memory allocated whole, and states and files
hold the filled slots (older states, which hold every slot, still load and equal)."""
import pytest
import torch

import memlayers as ml
from memlayers.memory import files
from memlayers.memory.sharding import Stripe
from memlayers.memory.state import fit_slots
from memlayers.memory.store import FIRST_SLOTS, slots_for
from memlayers.ops.knn_search import knn_search

B, H, D, DV, C = 2, 2, 8, 4, 300


class RingReference:
    """The ring of a memory allocated whole, written token by token in Python."""

    def __init__(self):
        self.keys, self.values = torch.zeros(B, H, C, D), torch.zeros(B, H, C, DV)
        self.positions = torch.full((B, C), -1, dtype=torch.long)
        self.count, self.ptr, self.next = 0, 0, 0

    def add(self, keys, values):
        skipped = max(keys.shape[2] - C, 0)  # an add longer than the ring keeps its last C tokens
        self.next += skipped
        for t in range(skipped, keys.shape[2]):
            self.keys[:, :, self.ptr], self.values[:, :, self.ptr] = keys[:, :, t], values[:, :, t]
            self.positions[:, self.ptr] = self.next
            self.ptr, self.next, self.count = (self.ptr + 1) % C, self.next + 1, min(self.count + 1, C)


def _bytes(slots):
    return B * H * slots * (D + DV) * 4 + B * slots * 8 + 3 * B * 8


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name


def test_buffers_grow_by_doubling_and_hold_what_a_whole_ring_holds():
    mem = ml.KNNMemory(B, H, D, DV, capacity=C, backend="torch")
    ref = RingReference()
    assert mem.allocated_slots == FIRST_SLOTS and mem.nbytes() == _bytes(FIRST_SLOTS)
    seen = []
    torch.manual_seed(0)
    for T in [5, 59, 1, 70, 130, 34, 17, 400, 3]:  # 64, 128, 256, then the capacity; wraps twice
        keys, values = torch.randn(B, H, T, D), torch.randn(B, H, T, DV)
        mem.add(keys, values)
        ref.add(keys, values)
        n = mem.filled
        assert n == ref.count and mem.allocated_slots == slots_for(n, C) and mem.keys.stride(-2) == 1
        assert mem.nbytes() == _bytes(mem.allocated_slots)
        assert torch.equal(mem.keys[:, :, :n], ref.keys[:, :, :n]) and torch.equal(mem.values[:, :, :n], ref.values[:, :, :n])
        assert torch.equal(mem.positions[:, :n], ref.positions[:, :n])
        assert mem.count.tolist() == [n] * B and mem.write_ptr.tolist() == [ref.ptr] * B
        q = torch.randn(B, 2 * H, 3, D)
        res = mem.search(q, 7)
        _, want = knn_search(q, ref.keys, 7, valid_lengths=torch.full((B,), ref.count), backend="torch")
        assert torch.equal(res.indices, want)
        seen.append(mem.allocated_slots)
    assert seen == [64, 64, 128, 256, 300, 300, 300, 300, 300]


def test_state_holds_the_filled_slots_and_round_trips(tmp_path):
    mem = ml.KNNMemory(B, H, D, DV, capacity=C)
    mem.add(torch.randn(B, H, 90, D), torch.randn(B, H, 90, DV))
    state = mem.state_dict()
    assert state["keys"].shape == (B, H, 90, D) and state["positions"].shape == (B, 90)
    assert state["capacity"].dim() == 0 and int(state["capacity"]) == C
    other = ml.KNNMemory(1, H, D, DV, capacity=7)  # another batch size and capacity: rebuilt to fit
    other.load_state_dict(state)
    assert (other.batch_size, other.capacity, other.allocated_slots) == (B, C, 128)
    _same_state(mem, other)
    mem.save(tmp_path / "a.safetensors")
    other.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    loaded = ml.KNNMemory.load(tmp_path / "a.safetensors")
    _same_state(mem, loaded)
    for m in (mem, loaded):  # both keep streaming alike, past the capacity
        torch.manual_seed(3)
        m.add(torch.randn(B, H, 250, D), torch.randn(B, H, 250, DV))
    _same_state(mem, loaded)
    empty = ml.KNNMemory(B, H, D, DV, capacity=C)
    assert empty.state_dict()["keys"].shape[2] == 0
    empty.save(tmp_path / "empty.safetensors")
    assert ml.KNNMemory.load(tmp_path / "empty.safetensors").allocated_slots == FIRST_SLOTS


def _old_state(mem):
    """``mem``'s state as saved before growth: every slot of the capacity, no capacity entry."""
    state = {k: v.clone() for k, v in mem.state_dict().items() if k != "capacity"}
    return fit_slots(state, mem.capacity)


@pytest.mark.parametrize("index", ["exact", "flat"])
def test_states_and_files_saved_before_load_and_equal(index, tmp_path):
    mem = ml.KNNMemory(B, H, D, DV, capacity=C, index=index)
    mem.add(torch.randn(B, H, 100, D), torch.randn(B, H, 100, DV))
    mem.reset([1])
    mem.add(torch.randn(B, H, 10, D), torch.randn(B, H, 10, DV))
    old = _old_state(mem)
    fresh = ml.KNNMemory(B, H, D, DV, capacity=C, index=index)
    fresh.load_state_dict(old)
    assert fresh.allocated_slots == 128 and fresh.filled == 110
    _same_state(mem, fresh)
    path = tmp_path / "old.safetensors"
    files.write(path, old, mem.config())
    loaded = ml.KNNMemory.load(path)
    _same_state(mem, loaded)
    q = torch.randn(B, H, 4, D)
    assert torch.equal(mem.search(q, 5).indices, loaded.search(q, 5).indices)


def test_a_reset_of_every_row_gives_the_storage_back():
    mem = ml.KNNMemory(B, H, D, DV, capacity=C)
    mem.add(torch.randn(B, H, 200, D), torch.randn(B, H, 200, DV))
    assert mem.allocated_slots == 256
    mem.reset([0])  # one row still holds 200: the allocation stays
    assert mem.allocated_slots == 256 and mem.filled == 200
    mem.reset_memory([1])
    assert mem.allocated_slots == FIRST_SLOTS and mem.nbytes() == _bytes(FIRST_SLOTS)
    mem.add(torch.randn(B, H, 70, D), torch.randn(B, H, 70, DV))
    mem.reset()
    assert mem.allocated_slots == FIRST_SLOTS and mem.count.tolist() == [0, 0]
    assert bool((mem.positions == -1).all()) and not bool(mem.keys.any())


def test_an_add_that_fails_while_growing_leaves_the_old_buffers(monkeypatch):
    pytest.importorskip("faiss")
    from memlayers.memory.faiss_index import FaissIndexSet

    mem = ml.KNNMemory(B, H, D, DV, capacity=C, index="flat")
    mem.add(torch.randn(B, H, 60, D), torch.randn(B, H, 60, DV))
    buffers = dict(mem.named_buffers())
    before = {n: b.clone() for n, b in buffers.items()}

    def failing_add(self, *args, **kwargs):
        raise RuntimeError("simulated FAISS failure")

    monkeypatch.setattr(FaissIndexSet, "_add", failing_add)
    with pytest.raises(RuntimeError, match="simulated"):
        mem.add(torch.randn(B, H, 10, D), torch.randn(B, H, 10, DV))  # 70 slots: would grow to 128
    monkeypatch.undo()
    assert mem.allocated_slots == FIRST_SLOTS and mem.filled == 60
    for name, b in mem.named_buffers():
        assert b is buffers[name] and torch.equal(b, before[name]), name
    mem.add(torch.randn(B, H, 10, D), torch.randn(B, H, 10, DV))
    assert mem.allocated_slots == 128 and mem.search(torch.randn(B, H, 1, D), 70).mask.all()


def _empty_state_without_capacity(state):
    state.update(fit_slots(state, 0), count=torch.zeros(B, dtype=torch.long), write_ptr=torch.zeros(B, dtype=torch.long))
    del state["capacity"]


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.__setitem__("capacity", torch.tensor(50)), "more than 50"),
    (lambda s: s.__setitem__("capacity", torch.tensor(0)), "capacity must be positive"),
    (lambda s: s.__setitem__("capacity", torch.tensor(3.0)), "one-element integer"),
    (lambda s: s.update(fit_slots(s, 40)), "more entries than the 40 slots"),
    (_empty_state_without_capacity, "no slots and the state names no capacity"),
])
def test_a_bad_capacity_or_slot_count_is_refused_before_anything_changes(edit, match):
    src = ml.KNNMemory(B, H, D, DV, capacity=C)
    src.add(torch.randn(B, H, 70, D), torch.randn(B, H, 70, DV))
    state = {k: v.clone() for k, v in src.state_dict().items()}
    edit(state)
    dst = ml.KNNMemory(B, H, D, DV, capacity=C)
    dst.add(torch.randn(B, H, 5, D), torch.randn(B, H, 5, DV))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(state)
    after = dst.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("C, W", [(37, 2), (10, 3), (8, 4), (5, 5), (200, 3)])
def test_stripe_write_reach_covers_every_slot_an_add_touches(C, W):
    """While the ring fills (each row's write pointer is its count, at most ``filled``), every local
    slot ``writes`` names lies below ``write_reach``: growth makes room before a sharded add."""
    for r in range(W):
        stripe = Stripe(r, W, C)
        for filled in range(C):
            for T in sorted({1, 2, W, W + 1, C // 2, C - filled, C} & set(range(1, C + 1))):
                reach = stripe.write_reach(filled, T)
                ptr = torch.tensor(sorted({0, filled // 2, filled}))
                local, _, written = stripe.writes(ptr, T)
                assert int(local.max()) < reach <= stripe.local_capacity
                # what the ring holds after the add lies below the reach too
                assert stripe.local_filled(min(filled + T, C)) <= reach


def test_rows_with_their_own_write_pointers_equal_memories_of_one_row():
    """Adds write rows that share their write pointer with slice copies and the others with a scatter:
    after partial resets (and loads of such states) every row equals a memory fed that row alone."""
    torch.manual_seed(5)
    mem = ml.KNNMemory(3, H, D, DV, capacity=C)
    rows = [ml.KNNMemory(1, H, D, DV, capacity=C) for _ in range(3)]
    for step, T in enumerate([40, 100, 7, 200, 150, 61, 330, 9]):
        keys, values = torch.randn(3, H, T, D), torch.randn(3, H, T, DV)
        mem.add(keys, values)
        for b, row in enumerate(rows):
            row.add(keys[b:b + 1], values[b:b + 1])
        if step in (1, 4):
            mem.reset([step % 3])
            rows[step % 3].reset()
        if step == 5:  # a state whose rows' write pointers differ loads as it was
            loaded = ml.KNNMemory(3, H, D, DV, capacity=C)
            loaded.load_state_dict(mem.state_dict())
            mem = loaded
        for b, row in enumerate(rows):
            for name, t in row.state_dict().items():
                if name == "capacity":
                    continue
                got = mem.state_dict()[name][b:b + 1]
                n = t.shape[2] if name in ("keys", "values") else (t.shape[1] if name == "positions" else None)
                if n is not None:  # the batch holds the most slots any row fills: the rest are empty
                    got = got[:, :, :n] if name != "positions" else got[:, :n]
                assert torch.equal(got, t), (step, b, name)
