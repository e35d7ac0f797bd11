"""Every public entry point rejects bad input with an error naming the argument, state untouched."""
import pytest
import torch

import memlayers.hf as mm

from hf_tiny import VOCAB, tiny_model


@pytest.fixture
def memorized():
    model = tiny_model("llama")
    mm.attach(model, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    mm.memorize(model, torch.randint(1, VOCAB, (2, 12)), chunk_size=8)
    return model


def _snapshot(model):
    mem = model.model.layers[0].self_attn.memory
    return {k: v.clone() for k, v in mem.state_dict().items()}, model.model.rotary_emb.offset.clone()


def _same(model, snap):
    mem = model.model.layers[0].self_attn.memory
    return all(torch.equal(v, snap[0][k]) for k, v in mem.state_dict().items()) and torch.equal(
        model.model.rotary_emb.offset, snap[1])


@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(input_ids=torch.rand(2, 5)), TypeError, "input_ids"),
    (dict(input_ids=torch.randint(1, VOCAB, (5,))), ValueError, "input_ids"),
    (dict(input_ids=torch.full((2, 5), VOCAB)), ValueError, "input_ids"),
    (dict(input_ids=torch.full((2, 5), -1)), ValueError, "input_ids"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 0))), ValueError, "input_ids"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 5), device="meta")), ValueError, "input_ids"),
    (dict(input_ids=torch.randint(1, VOCAB, (3, 5))), ValueError, "input_ids"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 5)), chunk_size=0), ValueError, "chunk_size"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 5)), chunk_size=2.0), TypeError, "chunk_size"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 5)), attention_mask=torch.zeros(2, 5)), ValueError, "attention_mask"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 5)), attention_mask=torch.ones(2, 4)), ValueError, "attention_mask"),
    (dict(input_ids=torch.randint(1, VOCAB, (2, 5)), progress="yes"), TypeError, "progress"),
])
def test_memorize_rejects_bad_input_before_any_change(memorized, kwargs, exc, name):
    snap = _snapshot(memorized)
    with pytest.raises(exc, match=name):
        mm.memorize(memorized, **kwargs)
    assert _same(memorized, snap)


@pytest.mark.parametrize("rows, exc", [(5, ValueError), ([-3], ValueError), ([True, 0], TypeError), (torch.ones(3, dtype=torch.bool), ValueError),
                                       (torch.tensor([0.5]), TypeError), (True, TypeError), ("0", TypeError)])
def test_reset_memory_rejects_bad_rows(memorized, rows, exc):
    snap = _snapshot(memorized)
    with pytest.raises(exc, match="rows"):
        mm.reset_memory(memorized, rows=rows)
    assert _same(memorized, snap)


@pytest.mark.parametrize("make, exc, name", [
    (lambda: mm.KNNMemoryConfig(top_k=0), ValueError, "top_k"),
    (lambda: mm.KNNMemoryConfig(combine="sum"), ValueError, "combine"),
    (lambda: mm.KNNMemoryConfig(position="rotate_on_read"), ValueError, "position"),
    (lambda: mm.KNNMemoryConfig(fixed_distance=-1), ValueError, "fixed_distance"),
    (lambda: mm.KNNMemoryConfig(layers="all"), TypeError, "layers"),
    (lambda: mm.KNNMemoryConfig(layers=[]), ValueError, "layers"),
    (lambda: mm.KNNMemoryConfig(gate_init=float("nan")), ValueError, "gate_init"),
    (lambda: mm.TitansMemoryConfig(max_lr=0), ValueError, "max_lr"),
    (lambda: mm.DKVBConfig(top_k=9, num_keys=8), ValueError, "top_k"),
])
def test_configs_reject_bad_values(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_attach_rejects_bad_models_and_configs_leaving_the_model_unchanged():
    model = tiny_model("llama")
    modules = list(model.modules())
    with pytest.raises(TypeError, match="model"):
        mm.attach("llama", mm.KNNMemoryConfig())
    with pytest.raises(TypeError, match="config"):
        mm.attach(model, {"top_k": 8})
    with pytest.raises(ValueError, match="layers"):
        mm.attach(model, mm.KNNMemoryConfig(layers=[2]))
    with pytest.raises(ValueError, match="layers"):
        mm.attach(model, mm.KNNMemoryConfig(layers=[1, -1]))
    with pytest.raises(ValueError, match="num_codebooks"):
        mm.attach(model, [mm.KNNMemoryConfig(), mm.DKVBConfig(num_codebooks=5)])
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation"):
        mm.attach(model, mm.KNNMemoryConfig())
    model.config._attn_implementation = "sdpa"
    assert list(model.modules()) == modules and "_memlayers" not in model.__dict__
    with pytest.raises(ValueError, match="no memory attached"):
        mm.detach(model)
    mm.attach(model, mm.KNNMemoryConfig(layers=[0]))
    with pytest.raises(ValueError, match="already attached"):
        mm.attach(model, mm.KNNMemoryConfig(layers=[-2]))


def test_unsupported_model_type_and_gpt2_position_limit():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32))
    with pytest.raises(ValueError, match="model"):
        mm.attach(bert, mm.KNNMemoryConfig())
    gpt2 = tiny_model("gpt2", max_position_embeddings=32)
    mm.attach(gpt2, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    mm.memorize(gpt2, torch.randint(1, VOCAB, (1, 20)))
    with pytest.raises(ValueError, match="input_ids"):
        mm.memorize(gpt2, torch.randint(1, VOCAB, (1, 20)))
    assert gpt2.transformer.wpe.offset.tolist() == [20]


def test_load_memory_rejects_a_directory_without_memories(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        mm.load_memory(tiny_model("llama"), tmp_path)


def test_old_config_names_warn_and_still_work():
    with pytest.warns(DeprecationWarning, match="store"):
        old = mm.KNNMemoryConfig(store="faiss", index="ivf")
    assert old.index == "ivf" and "store" not in old.to_dict()
    with pytest.warns(DeprecationWarning, match="store"):
        assert mm.KNNMemoryConfig(store="exact").index == "exact"
    with pytest.warns(DeprecationWarning, match="topk"):
        dkvb = mm.DKVBConfig(topk=3)
    assert dkvb.top_k == 3 and "topk" not in dkvb.to_dict()
    with pytest.raises(ValueError, match="disagree"), pytest.warns(DeprecationWarning):
        mm.DKVBConfig(topk=3, top_k=2)
