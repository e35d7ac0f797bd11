"""DDP and FSDP2 on 2 gloo CPU processes over a model with KNNMemoryAttention, a NeuralMemory (its
state in buffers: StatefulNeuralMemory) and a sharded ProductKeyMemory: each rank keeps its own
memories, and training equals two single-process runs on the same data split whose gradients are
averaged; FSDP2 matches DDP; a distributed checkpoint round-trips every rank's memories."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import memlayers as ml
import memlayers.distributed as mld

WORLD, B, T, DIM, STEPS, LR = 2, 2, 5, 16, 3, 0.1


class Tiny(nn.Module):
    """Residual stack of the three memory kinds, all state in buffers."""

    def __init__(self, pkm_group=None):
        super().__init__()
        self.attn = ml.KNNMemoryAttention(DIM, heads=2, top_k=3, capacity=12, xl_memory=True, backend="torch")
        self.neural = ml.StatefulNeuralMemory(ml.NeuralMemory(DIM, heads=2, chunk_size=4, backend="torch"))
        self.pkm = ml.ProductKeyMemory(DIM, heads=2, num_keys=6, top_k=3, value_dim=9, backend="torch",
                                       process_group=pkm_group)

    def forward(self, x):
        h = x + self.attn(x)
        h = h + self.neural(h)
        return h + self.pkm(h)


def _batch(step, split):
    g = torch.Generator().manual_seed(100 * step + split)
    return torch.randn(B, T, DIM, generator=g), torch.randn(B, T, DIM, generator=g)


def _loss(model, step, split):
    x, target = _batch(step, split)
    out = model(x)
    return out, ((out - target) ** 2).mean()


def _reference():
    """Two single-process models, one per data split, stepped with their averaged gradients."""
    torch.manual_seed(0)
    refs = [Tiny() for _ in range(WORLD)]
    refs[1].load_state_dict(refs[0].state_dict())
    init = {k: v.clone() for k, v in refs[0].state_dict().items()}
    outs = []
    for step in range(STEPS):
        grads, step_outs = [], []
        for split, ref in enumerate(refs):
            ref.zero_grad()
            out, loss = _loss(ref, step, split)
            loss.backward()
            step_outs.append(out.detach())
            grads.append({n: p.grad for n, p in ref.named_parameters()})
        with torch.no_grad():
            for ref in refs:
                for n, p in ref.named_parameters():
                    if grads[0][n] is not None:  # the Titans initial memory is read by fresh rows only
                        p -= LR * sum(g[n] for g in grads) / WORLD
        outs.append(step_outs)
    return init, refs, outs


def _train(model, wrapped, rank):
    opt = torch.optim.SGD(wrapped.parameters(), lr=LR)
    outs = []
    for step in range(STEPS):
        opt.zero_grad()
        out, loss = _loss(wrapped, step, rank)
        loss.backward()
        opt.step()
        outs.append(out.detach())
    return outs


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _assert_matches(model, ref, rank):
    """Weights equal the reference's (this rank's columns of the sharded table); memories equal ref's."""
    start, stop = model.pkm.value_columns
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        q = q[:, start:stop] if name == "pkm.values" else q
        torch.testing.assert_close(_full(p.detach()), q, rtol=1e-5, atol=1e-6, msg=name)
    for name in ("keys", "values", "positions", "count"):
        torch.testing.assert_close(getattr(model.attn.memory, name), getattr(ref.attn.memory, name), msg=name)
    torch.testing.assert_close(model.attn.xl_keys, ref.attn.xl_keys)
    torch.testing.assert_close(model.neural.weights_0, ref.neural.weights_0, rtol=1e-5, atol=1e-6)


def _differs_across_ranks(t):
    both = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(both, t.contiguous())
    return not torch.equal(both[0], both[1])


def _worker(rank, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        init, refs, ref_outs = _reference()
        pkm_group = dist.new_group()  # the table's collectives apart from DDP's gradient all-reduces

        # Plain DDP (broadcast_buffers=True) overwrites rank 1's memory with rank 0's: the bug fixed here.
        plain = Tiny()
        plain.attn.bind_batch(B)
        plain_ddp = DistributedDataParallel(plain)
        for step in range(2):
            plain_ddp(_batch(step, rank)[0])
        assert not _differs_across_ranks(plain.attn.memory.keys[:, :, :T].contiguous())

        # DDP after prepare_ddp.
        model = Tiny(pkm_group)
        model.load_state_dict(init)  # the sharded table keeps its columns of the reference's
        mld.prepare_ddp(model, batch_size=B)
        assert {"attn.memory.keys", "attn.xl_keys", "pkm.values"} <= set(model._ddp_params_and_buffers_to_ignore)
        ddp_outs = _train(model, DistributedDataParallel(model, find_unused_parameters=True), rank)
        for step in range(STEPS):
            torch.testing.assert_close(ddp_outs[step], ref_outs[step][rank], rtol=1e-5, atol=1e-6)
        _assert_matches(model, refs[rank], rank)
        assert _differs_across_ranks(model.attn.memory.keys) and _differs_across_ranks(model.neural.weights_0)

        # FSDP2 of the same model trains like DDP.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        sharded = Tiny(pkm_group)
        sharded.load_state_dict(init)
        fully_shard(sharded, mesh=init_device_mesh("cpu", (WORLD,)),
                    ignored_params=mld.prepare_fully_shard(sharded, batch_size=B))
        assert type(sharded.attn.memory.keys) is torch.Tensor  # memories are not sharded
        fsdp_outs = _train(sharded, sharded, rank)
        for step in range(STEPS):
            torch.testing.assert_close(fsdp_outs[step], ddp_outs[step], rtol=1e-5, atol=1e-6)
        _assert_matches(sharded, refs[rank], rank)
    finally:
        dist.destroy_process_group()


def test_ddp_and_fsdp2_keep_each_ranks_memories(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)


def _checkpoint_worker(rank, init_file, path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        pkm_group = dist.new_group()
        torch.manual_seed(0)
        model = Tiny(pkm_group)
        mld.prepare_ddp(model, batch_size=B)
        ddp = DistributedDataParallel(model, find_unused_parameters=True)
        _train(model, ddp, rank)
        mld.save(ddp, path)

        torch.manual_seed(1)
        restored = Tiny(pkm_group)  # other weights, no memory built yet
        mld.load(restored, path)
        saved, loaded = model.state_dict(), restored.state_dict()
        assert saved.keys() == loaded.keys()
        for name, t in saved.items():
            assert torch.equal(loaded[name], t), name
        assert _differs_across_ranks(restored.attn.memory.keys)
        # The restored memories read as the saved ones: the next segment gives the same output.
        x = _batch(STEPS, rank)[0]
        torch.testing.assert_close(restored(x), model(x), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_distributed_checkpoint_round_trips_every_ranks_memories(tmp_path):
    mp.spawn(_checkpoint_worker, args=(str(tmp_path / "init"), str(tmp_path / "ckpt")), nprocs=WORLD, join=True)
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    for rank in range(WORLD):  # each rank's memory and table shard under keys of its own
        assert {f"attn.memory.keys@rank{rank}", f"attn.xl_values@rank{rank}", f"pkm.values@rank{rank}"} <= set(keys)
    assert "attn.q_proj.weight" in keys and "attn.q_proj.weight@rank0" not in keys  # replicated: one copy


def test_load_state_dict_refuses_another_ranks_entries():
    model = Tiny()
    model.attn.bind_batch(B)
    sd = mld.state_dict(model)
    assert "attn.memory.keys@rank0" in sd and "attn.q_proj.weight" in sd
    with pytest.raises(ValueError, match="other ranks"):
        mld.load_state_dict(model, {"attn.memory.keys@rank1": sd["attn.memory.keys@rank0"]})
