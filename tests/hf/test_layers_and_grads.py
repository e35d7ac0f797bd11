"""Titans and DKVB attachments start as no-ops; gradients reach what trains, never the stores."""
import torch

import memlayers.hf as mm
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, logits, tiny_model


def test_zero_initialized_titans_and_dkvb_leave_logits_unchanged_until_trained():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 40))
    before = logits(model, ids)
    mm.attach(model, [mm.TitansMemoryConfig(layers=[0, 1], chunk_size=16, backend="torch"),
                      mm.DKVBConfig(layers=[1], num_codebooks=4, num_keys=16, key_dim=8, backend="torch")])
    mm.memorize(model, ids[:, :20], chunk_size=16)  # the Titans memory learned something...
    assert model.model.layers[0].titans_memory.seen.tolist() == [20, 20]
    assert torch.equal(logits(model, ids), before)  # ...but the zero gates hide it
    with torch.no_grad():
        model.model.layers[0].titans_gate.fill_(0.5)
    assert rel_err(logits(model, ids), before) > 1e-4


def test_gradients_reach_gates_and_titans_parameters_but_not_memory_stores():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 40))
    mm.attach(model, [mm.KNNMemoryConfig(layers=[1], top_k=8, combine="gate", backend="torch"),
                      mm.TitansMemoryConfig(layers=[0], chunk_size=16, backend="torch")])
    mm.memorize(model, ids[:, :24], chunk_size=8)
    with torch.no_grad():
        model.model.layers[0].titans_gate.fill_(0.1)  # a zero gate passes no gradient behind it
    model.train()
    loss = model(ids[:, 24:], labels=ids[:, 24:]).loss
    loss.backward()
    knn = model.model.layers[1].self_attn
    titans = model.model.layers[0]
    assert knn.gate.grad is not None and knn.gate.grad.abs().sum() > 0
    assert titans.titans_gate.grad.abs().sum() > 0
    assert titans.titans_memory.neural_memory.to_qkv.weight.grad.abs().sum() > 0
    assert titans.titans_memory.neural_memory.to_out.weight.grad.abs().sum() > 0
    assert not knn.memory.keys.requires_grad and knn.memory.keys.grad is None
    assert not knn.memory.values.requires_grad and knn.memory.values.grad is None
    assert all(not b.requires_grad and b.grad is None for b in titans.titans_memory.buffers())
