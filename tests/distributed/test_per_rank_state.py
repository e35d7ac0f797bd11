"""What memlayers.distributed treats as per rank, checked without a process group (one process)."""
import pytest
import torch
from torch.nn.parallel import DistributedDataParallel

import memlayers.distributed as mld
from test_data_parallel import B, T, DIM, Tiny


def test_prepare_ddp_names_every_memory_buffer_also_those_built_later():
    model = Tiny()
    with pytest.raises(ValueError, match="attn"):  # the kNN memory is built by the first forward
        mld.prepare_ddp(model)
    assert model.attn.memory is None and not hasattr(model, "_ddp_params_and_buffers_to_ignore")
    model._ddp_params_and_buffers_to_ignore = ["neural.neural_memory.norm.weight"]  # a caller's own entry is kept
    mld.prepare_ddp(model, batch_size=B)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    memory = {f"attn.memory.{n}" for n, _ in model.attn.memory.named_buffers()}
    xl = {f"attn.xl_{n}" for n in ("keys", "values", "start", "valid")}  # empty until a forward
    titans = {f"neural.{n}" for n, _ in model.neural.named_buffers()}
    assert memory | xl | titans | {"neural.neural_memory.norm.weight"} <= ignored
    assert not any(n.startswith(("attn.q_proj", "pkm.", "neural.neural_memory.")) for n in ignored - {"neural.neural_memory.norm.weight"})
    assert mld.sharded_parameters(model) == [] and mld.prepare_fully_shard(model) == set()
    with pytest.raises(TypeError, match="batch_size"):
        mld.prepare_ddp(Tiny(), batch_size=2.0)


def test_checkpoint_round_trip_in_one_process(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    for _ in range(3):
        model(torch.randn(B, T, DIM))
    mld.save(model, tmp_path / "ckpt")
    restored = Tiny()  # other weights, no memory yet: load allocates the saved shapes
    mld.load(restored, tmp_path / "ckpt")
    for (name, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(B, T, DIM)
    assert torch.equal(restored(x), model(x))
