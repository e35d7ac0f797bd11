"""A KNNMemory sharded over a gloo process group of 2 CPU processes equals one unsharded memory (issue 15)."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memlayers as ml
from memlayers.memory.sharding import Stripe, fetch_winners

WORLD, B, H, HQ, D, DV, C, K = 2, 3, 2, 4, 16, 8, 37, 6  # odd capacity: ranks hold 19 and 18 slots
BIG = 301  # a capacity whose shards grow: 151 and 150 slots per rank, 64 allocated at first
STEPS = [5, 1, 13, 60, 3, 1, 7, 9]  # 60 > C: an add longer than the ring


def _assert_same_result(a, b):
    assert torch.equal(a.mask, b.mask) and torch.equal(a.indices, b.indices)
    assert torch.allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)  # another GEMV shape, same fp32 math
    assert torch.equal(a.positions, b.positions)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        group = dist.group.WORLD
        torch.manual_seed(0)  # every rank makes the same calls with the same data
        sharded = ml.KNNMemory(B, H, D, DV, capacity=C, backend="torch", process_group=group)
        ref = ml.KNNMemory(B, H, D, DV, capacity=C, backend="torch")
        assert sharded.keys.shape[2] == 19
        for step, T in enumerate(STEPS):
            keys, values = torch.randn(B, H, T, D), torch.randn(B, H, T, DV)
            sharded.add(keys, values)
            ref.add(keys, values)
            if step == 4:
                sharded.reset([1])
                ref.reset([1])
            q = torch.randn(B, HQ, 5, D)
            _assert_same_result(sharded.search(q, K), ref.search(q, K))
        # bf16 rows travel as their own bytes (no widening); gather=False fetches positions alone.
        low = ml.KNNMemory(B, H, D, DV, capacity=C, backend="torch", dtype=torch.bfloat16, process_group=group)
        low_ref = ml.KNNMemory(B, H, D, DV, capacity=C, backend="torch", dtype=torch.bfloat16)
        for T in (30, 20):
            keys, values = torch.randn(B, H, T, D, dtype=torch.bfloat16), torch.randn(B, H, T, DV, dtype=torch.bfloat16)
            low.add(keys, values)
            low_ref.add(keys, values)
        q = torch.randn(B, HQ, 5, D, dtype=torch.bfloat16)
        a, b = low.search(q, K), low_ref.search(q, K)
        assert a.keys.dtype == torch.bfloat16 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        a, b = low.search(q, K, gather=False), low_ref.search(q, K, gather=False)
        assert a.keys is None and torch.equal(a.indices, b.indices) and torch.equal(a.positions, b.positions)
        sharded.save(out_dir / f"shard{rank}.safetensors")
        if rank == 0:
            ref.save(out_dir / "ref.safetensors")
        dist.barrier()
        q = torch.randn(B, HQ, 5, D)
        paths = [out_dir / "shard1.safetensors", out_dir / "shard0.safetensors"]
        _assert_same_result(ml.KNNMemory.load_shards(paths, process_group=group).search(q, K), ref.search(q, K))
        # One unsharded memory's state onto 2 ranks, then both keep streaming in step.
        resharded = ml.KNNMemory(1, H, D, DV, capacity=5, backend="torch", process_group=group)
        resharded.load_state_dict(ref.state_dict())
        keys, values = torch.randn(B, H, 11, D), torch.randn(B, H, 11, DV)
        resharded.add(keys, values)
        ref.add(keys, values)
        _assert_same_result(resharded.search(q, K), ref.search(q, K))
        with pytest.raises(RuntimeError, match="load_shards"):  # another rank's shard
            resharded.load_state_dict({**sharded.state_dict(), "shard": torch.tensor([1 - rank, WORLD, C])})
        # A larger capacity: each rank's buffers grow as the ring fills; shards saved half full load back.
        big = ml.KNNMemory(B, H, D, DV, capacity=BIG, backend="torch", process_group=group)
        big_ref = ml.KNNMemory(B, H, D, DV, capacity=BIG, backend="torch")
        assert big.allocated_slots == 64
        for T in (50, 90, 40):
            keys, values = torch.randn(B, H, T, D), torch.randn(B, H, T, DV)
            big.add(keys, values)
            big_ref.add(keys, values)
            _assert_same_result(big.search(q, K), big_ref.search(q, K))
        assert 64 < big.allocated_slots < -(-BIG // WORLD)
        big.save(out_dir / f"big{rank}.safetensors")
        if rank == 0:
            big_ref.save(out_dir / "big_ref.safetensors")
        dist.barrier()
        big = ml.KNNMemory.load_shards([out_dir / f"big{r}.safetensors" for r in range(WORLD)], process_group=group)
        keys, values = torch.randn(B, H, 200, D), torch.randn(B, H, 200, DV)  # wraps
        big.add(keys, values)
        big_ref.add(keys, values)
        _assert_same_result(big.search(q, K), big_ref.search(q, K))
    finally:
        dist.destroy_process_group()


def test_sharded_memory_equals_one_unsharded_memory(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), tmp_path), nprocs=WORLD, join=True)
    # The shards loaded onto one process rebuild exactly the unsharded memory's buffers.
    ref = ml.KNNMemory.load(tmp_path / "ref.safetensors")
    merged = ml.KNNMemory.load_shards([tmp_path / "shard0.safetensors", tmp_path / "shard1.safetensors"])
    for (name, a), (_, b) in zip(ref.named_buffers(), merged.named_buffers()):
        assert torch.equal(a, b), name
    ref = ml.KNNMemory.load(tmp_path / "big_ref.safetensors")  # half full: shards of filled slots
    merged = ml.KNNMemory.load_shards([tmp_path / "big0.safetensors", tmp_path / "big1.safetensors"])
    assert ref.filled == 180 and merged.allocated_slots == ref.allocated_slots == 256
    for (name, a), (_, b) in zip(ref.state_dict().items(), merged.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="load_shards"):
        ml.KNNMemory.load(tmp_path / "shard0.safetensors")
    with pytest.raises(ValueError, match="each rank's shard once"):
        ml.KNNMemory.load_shards([tmp_path / "shard0.safetensors"] * 2)


@pytest.mark.parametrize("C, W", [(37, 2), (10, 3), (8, 4), (5, 5)])
def test_stripe_writes_cover_every_token_once(C, W):
    # Every token of an add lands on exactly one rank, in the slot the unsharded ring gives it.
    for T in sorted({1, 2, W, min(W + 1, C), C - 1, C} - {0}):  # an add keeps at most C tokens
        for ptr in range(C):
            owner = {}
            for r in range(W):
                local, token, written = Stripe(r, W, C).writes(torch.tensor([ptr]), T)
                assert len(set(local[0].tolist())) == local.shape[1]  # distinct slots: a well-defined scatter
                for l, t in zip(local[0][written[0]].tolist(), token[0][written[0]].tolist()):
                    assert t not in owner
                    owner[t] = l * W + r
            assert owner == {t: (ptr + t) % C for t in range(T)}


def test_process_group_needs_the_exact_index():
    with pytest.raises(ValueError, match="exact"):
        ml.KNNMemory(1, 1, 4, index="flat", process_group=object())


def _fetch_worker(rank, init_file, world):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(1)
        truth = torch.randint(1, 256, (40, 13), dtype=torch.uint8, generator=gen)  # the same on every rank
        spread = torch.randint(-1, world, (40,), generator=gen)  # all-gather of the owners' packs
        skewed = torch.where(torch.arange(40) % 10 == 0, spread, torch.zeros(40, dtype=torch.long))  # all-reduce
        for owner in (spread, skewed, torch.full((40,), -1)):
            mine = torch.where((owner == rank)[:, None], truth, torch.randint_like(truth, 256))  # others: junk
            got = fetch_winners(mine, owner, dist.group.WORLD)
            assert torch.equal(got, truth.masked_fill((owner < 0)[:, None], 0))
    finally:
        dist.destroy_process_group()


def test_fetch_winners_returns_each_owners_rows(tmp_path):
    # Three ranks, so that both ways run: evenly spread owners (all-gather) and one rank owning most (all-reduce).
    mp.spawn(_fetch_worker, args=(str(tmp_path / "init"), 3), nprocs=3, join=True)
