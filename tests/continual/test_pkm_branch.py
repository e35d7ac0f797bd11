"""The product-key memory branch: zero-initialized (bit-identical model), exact detach, the same read
as ProductKeyMemory, observers see the slots read."""
import pytest
import torch

import memlayers as ml
from memlayers.continual import recording
from memlayers.hf import PKMConfig
from memlayers.hf.pkm_branch import PKMBranch, pkm_branches
from memlayers.layers.pkm import ProductKeyMemory

from conftest import batch, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_attach_is_bit_identical_and_detach_restores(make):
    model = make()
    ids, mask = batch()
    mlps = [layer.mlp for layer in (model.model.layers if hasattr(model, "model") else model.transformer.h)]
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        branches = pkm_branches(ml.attach(model, PKMConfig(layers=[0, -1], heads=2, num_keys=8, top_k=3)))
        assert [b.layer_index for b in branches] == [0, len(mlps) - 1]
        attached = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(attached, before)
        # Trained (non-zero) values change the model; detach brings back the very same modules.
        for b in branches:
            b.pkm.values.normal_()
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, before)
        ml.detach(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    assert all(layer.mlp is mlp for layer, mlp in zip(layers, mlps))
    assert torch.equal(after, before)
    assert pkm_branches(model) == []


@pytest.mark.parametrize("value_dim", [None, 20])
def test_read_equals_product_key_memory_forward(value_dim):
    torch.manual_seed(3)
    mlp = torch.nn.Linear(48, 48)
    branch = PKMBranch(mlp, PKMConfig(heads=3, num_keys=7, top_k=5, value_dim=value_dim, backend="torch"), 48, 0)
    reference = ProductKeyMemory(48, 3, 7, 5, value_dim=value_dim, qk_norm=True, backend="torch")
    reference.load_state_dict(branch.pkm.state_dict())
    with torch.no_grad():
        for p in (branch.pkm.values, reference.values):
            p.copy_(torch.randn_like(p) if p is branch.pkm.values else branch.pkm.values)
    x = torch.randn(2, 9, 48)
    assert torch.equal(branch.read(x), reference(x))
    assert torch.equal(branch(x), mlp(x) + reference(x))


def test_observers_see_the_slots_each_token_read():
    model = tiny_llama()
    (branch,) = pkm_branches(ml.attach(model, PKMConfig(layers=[1], heads=2, num_keys=6, top_k=4)))
    ids, mask = batch(B=3, L=7)
    seen = {}
    hook = branch.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0]))
    with recording([branch]) as recorded, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    hook.remove()
    assert branch.observers == []  # removed on exit
    (indices,) = recorded[0]
    assert indices.shape == (3 * 7, 2 * 4)
    expect, _ = branch.pkm.address(seen["x"].reshape(-1, 48))
    assert torch.equal(indices, expect.reshape(3 * 7, -1))


def test_seed_fixes_the_hash_and_config_is_checked():
    a, b = tiny_llama(), tiny_llama()
    (ba,) = pkm_branches(ml.attach(a, PKMConfig(layers=[0], num_keys=5, top_k=2, seed=7)))
    (bb,) = pkm_branches(ml.attach(b, PKMConfig(layers=[0], num_keys=5, top_k=2, seed=7)))
    assert torch.equal(ba.pkm.keys, bb.pkm.keys) and torch.equal(ba.pkm.query.weight, bb.pkm.query.weight)
    with pytest.raises(ValueError, match="already attached to decoder layer 0"):
        ml.attach(a, PKMConfig(layers=[0]))
    with pytest.raises(ValueError, match="top_k"):
        PKMConfig(num_keys=4, top_k=5)
    with pytest.raises(ValueError, match="key_dim"):
        PKMConfig(key_dim=7)
    with pytest.raises(TypeError, match="qk_norm"):
        PKMConfig(qk_norm=1)
    with pytest.raises(TypeError, match="config"):
        ml.attach(tiny_llama(), {"layers": [0]})
    c = tiny_llama()
    with pytest.raises(ValueError, match="out of range"):
        ml.attach(c, PKMConfig(layers=[5]))
    assert pkm_branches(c) == [] and not isinstance(c.model.layers[0].mlp, PKMBranch)
    with pytest.raises(ValueError, match="no memory attached"):
        ml.detach(c)


def test_pkm_memory_saves_and_loads_with_the_model(tmp_path):
    """Trained slot values travel with save_pretrained / from_pretrained like every other memory."""
    model = tiny_llama()
    (branch,) = pkm_branches(ml.attach(model, PKMConfig(layers=[1], heads=2, num_keys=6, top_k=4)))
    with torch.no_grad():
        branch.pkm.values.normal_()
    ids, mask = batch()
    with torch.no_grad():
        expect = model(input_ids=ids, attention_mask=mask).logits
    ml.save_pretrained(model, tmp_path)
    fresh = ml.from_pretrained(tmp_path)
    (loaded,) = pkm_branches(fresh)
    assert torch.equal(loaded.pkm.values, branch.pkm.values)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, expect)
