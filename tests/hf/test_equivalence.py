"""memorize + forward over the rest == one full-context forward; detach restores the model exactly."""
import pytest
import torch

import memlayers.hf as mm
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, logits, tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gpt2"])
def test_memorize_then_rest_equals_full_context(family):
    model = tiny_model(family)
    ids = torch.randint(1, VOCAB, (2, 90))
    full = logits(model, ids)
    mm.attach(model, mm.KNNMemoryConfig(top_k=64, backend="torch"))
    mm.memorize(model, ids[:, :63], chunk_size=16)  # a ragged last chunk
    rest = logits(model, ids[:, 63:])
    assert rel_err(rest, full[:, 63:]) < 1e-4
    # Without the memory the rest alone is a different computation: the test can fail.
    assert rel_err(logits(mm.reset_memory(model), ids[:, 63:]), full[:, 63:]) > 1e-2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_detach_is_bit_identical(family):
    model = tiny_model(family)
    ids = torch.randint(1, VOCAB, (2, 40))
    before = logits(model, ids)
    names = [n for n, _ in model.named_modules()]
    attn = model.model.layers[0].self_attn if family == "llama" else model.transformer.h[0].attn
    mm.attach(model, [mm.KNNMemoryConfig(layers=[0, -1], top_k=8, backend="torch"),
                      mm.TitansMemoryConfig(layers=[-1], chunk_size=16, backend="torch")])
    assert torch.equal(logits(model, ids), before)  # nothing memorized, zero gates: unchanged
    mm.memorize(model, ids[:, :20], chunk_size=8)
    assert not torch.equal(logits(model, ids[:, 20:]), before[:, 20:])
    mm.detach(model)
    assert torch.equal(logits(model, ids), before)
    assert [n for n, _ in model.named_modules()] == names
    assert (model.model.layers[0].self_attn if family == "llama" else model.transformer.h[0].attn) is attn
    assert model.config._attn_implementation == "sdpa"


def test_eager_base_and_layer_filter():
    model = tiny_model("llama", attn_implementation="eager", num_hidden_layers=3)
    ids = torch.randint(1, VOCAB, (1, 50))
    full = logits(model, ids)
    mm.attach(model, mm.KNNMemoryConfig(layers=lambda i, layer: True, top_k=64, backend="torch"))
    assert model.config._attn_implementation == "memlayers_eager_llama"
    mm.memorize(model, ids[:, :30], chunk_size=10)
    assert rel_err(logits(model, ids[:, 30:]), full[:, 30:]) < 1e-4


def test_gate_combine_and_other_position_policies_use_the_memory():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 40))
    alone = logits(model, ids[:, 24:])
    outs = []
    for cfg in (mm.KNNMemoryConfig(top_k=4, combine="gate", backend="torch"),
                mm.KNNMemoryConfig(top_k=4, position="none", backend="torch"),
                mm.KNNMemoryConfig(top_k=4, position="fixed", fixed_distance=16, backend="torch")):
        mm.attach(model, cfg)
        mm.memorize(model, ids[:, :24], chunk_size=8)
        out = logits(model, ids[:, 24:])
        assert torch.isfinite(out).all()
        assert rel_err(out, alone) > 1e-3  # the memories changed the outputs
        outs.append(out)
        mm.detach(model)
    # Distance 0 is no rotation at all: "fixed" at 0 must equal "none".
    mm.attach(model, mm.KNNMemoryConfig(top_k=4, position="fixed", fixed_distance=0, backend="torch"))
    mm.memorize(model, ids[:, :24], chunk_size=8)
    assert rel_err(logits(model, ids[:, 24:]), outs[1]) < 1e-6
