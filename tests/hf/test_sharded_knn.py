"""A kNN memory sharded over a process group through ``KNNMemoryConfig(process_group=...)`` (issue 15):
the attached model gives what the unsharded one gives, and the group is never saved. One process, a
gloo group of one rank: the sharded store and the sharded read path both run (the equality on several
ranks is tested on the store itself, tests/memory/test_sharded.py)."""
import copy
import pytest
import torch

import memlayers.hf as mm

from hf_tiny import VOCAB, logits, tiny_model


def test_sharded_memory_equals_unsharded(gloo_group, tmp_path):
    torch.manual_seed(0)
    base = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 50))
    outs = []
    for process_group in (None, gloo_group):
        model = copy.deepcopy(base)
        mm.attach(model, mm.KNNMemoryConfig(layers=[0, 1], top_k=6, capacity=37, backend="torch",
                                            process_group=process_group))
        mm.memorize(model, ids[:, :40], chunk_size=16)  # 40 tokens into 37 slots: the ring wraps
        outs.append(logits(model, ids[:, 40:]))
    assert model.model.layers[0].self_attn.memory.process_group is gloo_group
    assert torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[0], logits(base, ids[:, 40:]), rtol=1e-3, atol=1e-3)  # memory matters
    mm.save_pretrained(model, tmp_path)  # the group belongs to this process: not in the saved config
    assert "process_group" not in (tmp_path / "memlayers.json").read_text()


def test_process_group_is_checked(gloo_group):
    with pytest.raises(TypeError, match="process_group"):
        mm.KNNMemoryConfig(process_group="world")
    with pytest.raises(ValueError, match="exact index only"):
        mm.KNNMemoryConfig(index="flat", process_group=gloo_group)


def test_padded_memorize_of_a_sharded_memory(gloo_group):
    """Rows of different lengths are memorized row by row: each row's state keeps its shard entry."""
    torch.manual_seed(0)
    base = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, :13] = 0  # row 1 left-padded
    outs = []
    for process_group in (None, gloo_group):
        model = copy.deepcopy(base)
        mm.attach(model, mm.KNNMemoryConfig(layers=[0, 1], top_k=6, capacity=37, backend="torch",
                                            process_group=process_group))
        mm.memorize(model, ids, chunk_size=16, attention_mask=mask)
        outs.append(model(ids[:, :5]).logits)
    assert torch.allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
