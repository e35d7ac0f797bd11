"""``max_distance``: under "rotate", memories farther than it from the memorized end are read as if that close."""
import pytest
import torch

import memlayers.hf as mm
from memlayers.hf.state import memory_wrappers
from memlayers.layers.knn_read import clamped_positions
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, logits, tiny_model


def test_clamped_positions():
    pos = torch.tensor([[0, 5, 9, 12, -1]])
    assert torch.equal(clamped_positions(pos, 13, 6), torch.tensor([[7, 7, 9, 12, -1]]))
    assert torch.equal(clamped_positions(pos, 13, 0), pos)    # 0: no limit
    assert torch.equal(clamped_positions(pos, 13, 20), pos)   # nothing that far


def test_default_is_half_the_trained_positions():
    model = mm.attach(tiny_model("llama", max_position_embeddings=96), mm.KNNMemoryConfig(backend="torch"))
    assert {w.max_distance for w in memory_wrappers(model, ("knn",))} == {48}
    model = mm.attach(tiny_model("llama"), mm.KNNMemoryConfig(max_distance=0, backend="torch"))
    assert {w.max_distance for w in memory_wrappers(model, ("knn",))} == {0}


def test_within_the_limit_exact_beyond_it_moved():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 70))
    full = logits(model, ids)
    outs = {}
    for limit in (0, 64, 8):
        mm.attach(model, mm.KNNMemoryConfig(top_k=64, max_distance=limit, backend="torch"))
        mm.memorize(model, ids[:, :60], chunk_size=16)
        outs[limit] = logits(model, ids[:, 60:])
        mm.detach(model)
    assert rel_err(outs[0], full[:, 60:]) < 1e-4
    assert rel_err(outs[64], full[:, 60:]) < 1e-4  # every memory lies within 64 tokens of the end
    assert rel_err(outs[8], full[:, 60:]) > 1e-3   # the older ones were read closer than they are


def test_bad_max_distance():
    with pytest.raises(ValueError, match="max_distance"):
        mm.KNNMemoryConfig(max_distance=-1)
    with pytest.raises(TypeError, match="max_distance"):
        mm.KNNMemoryConfig(max_distance=2.5)
