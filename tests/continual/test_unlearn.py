"""Exact unlearning: forgetting groups resets exactly their slots; everything else stays bit for bit."""
import pytest
import torch

from memlayers.continual import SparseMemoryFinetuning, slot_stats

from conftest import batch
from test_sparse import lm_loss, setup


def inject(model, branches, ft, ids, mask, groups, steps=3):
    ft.begin(model, ids, mask, groups)
    opt = torch.optim.Adam(ft.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        with ft.token_groups(groups, mask):
            lm_loss(model, ids, mask).backward()
        opt.step()
    ft.end()


def test_forget_resets_exactly_the_forgotten_groups_slots():
    model, branches = setup(num_keys=8)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    background = slot_stats(model, branches, [batch(B=6, L=10, seed=5)])
    ft = SparseMemoryFinetuning(branches, background, slots_per_group=6)
    ids1, mask1 = batch(B=4, L=9, seed=6)
    ids2, mask2 = batch(B=4, L=9, seed=7)
    inject(model, branches, ft, ids1, mask1, torch.tensor([0, 0, 1, 1]))   # two sequential batches
    inject(model, branches, ft, ids2, mask2, torch.tensor([2, 3, 2, 3]))
    assert ft.ledger.groups == [0, 1, 2, 3]
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    forgotten = ft.ledger.slots(1), ft.ledger.slots(2)

    with pytest.raises(ValueError, match=r"groups \[9\]"):
        ft.ledger.forget([1, 9])  # checked first: nothing changes
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())

    assert ft.ledger.forget([1, 2]) == sum(r.numel() for s in forgotten for r in s.values())
    assert ft.ledger.groups == [0, 3]
    state = model.state_dict()
    for k, v in state.items():
        if not k.endswith("pkm.values"):
            assert torch.equal(v, trained[k]), k  # no other parameter moved
    for m, b in enumerate(branches):
        key = next(k for k in state if k.endswith("pkm.values") and f"layers.{b.layer_index}." in k)
        reset = torch.zeros(b.num_slots, dtype=torch.bool)
        for s in forgotten:
            if m in s:
                reset[s[m]] = True
        assert reset.any() or m == 1
        assert torch.equal(state[key][reset], original[key][reset]), key # forgotten: back to before
        assert torch.equal(state[key][~reset], trained[key][~reset]), key     # the rest: as trained
        assert not torch.equal(state[key], original[key])                     # groups 0 and 3 remain

    ft.ledger.forget([0, 3])
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_record_refuses_a_slot_owned_by_another_group():
    model, branches = setup()
    ft = SparseMemoryFinetuning(branches, slot_stats(model, branches, [batch(seed=5)]), slots_per_group=3)
    v = branches[0].pkm.values
    ft.ledger.record(0, 0, torch.tensor([4, 5]), v[[4, 5]])
    with pytest.raises(ValueError, match="already belong"):
        ft.ledger.record(1, 0, torch.tensor([5]), v[[5]])
    with pytest.raises(ValueError, match="memory"):
        ft.ledger.record(1, 2, torch.tensor([1]), v[[1]])
    assert ft.ledger.groups == [0]
