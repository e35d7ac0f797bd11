"""Sparse memory fine-tuning: the trainable rows are an exact re-parameterization of the value table
(same forward, gradient equal to the dense gradient's rows), group masking, TF-IDF selection."""
import pytest
import torch

from memlayers.continual import SlotStats, SparseMemoryFinetuning, TrainableSlots, slot_stats, tfidf
import memlayers as ml
from memlayers.hf import PKMConfig
from memlayers.hf.pkm_branch import pkm_branches

from conftest import batch, tiny_llama


def lm_loss(model, ids, mask):
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def setup(num_keys=6, seed=0):
    torch.manual_seed(seed)
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    branches = pkm_branches(ml.attach(model, PKMConfig(layers=[0, 2], heads=2, num_keys=num_keys, top_k=3, backend="torch")))
    with torch.no_grad():
        for b in branches:
            b.pkm.values.normal_(0, 0.3)  # a table that was already trained: deltas add to it
    return model, branches


def test_trainable_rows_gradient_equals_dense_gradient_rows():
    model, branches = setup()
    ids, mask = batch(B=3, L=8)
    rows = [torch.tensor([0, 7, 11, 30, 35]), torch.tensor([2, 3, 19])]
    # Dense: gradient of the whole table.
    for b in branches:
        b.pkm.values.requires_grad_(True)
    lm_loss(model, ids, mask).backward()
    dense = [b.pkm.values.grad.clone() for b in branches]
    for b in branches:
        b.pkm.values.requires_grad_(False)
        b.pkm.values.grad = None
    # Sparse: only the chosen rows, outside the table.
    for b, r in zip(branches, rows):
        b.trainable = TrainableSlots(b.num_slots, r, torch.zeros_like(r), b.pkm.values.shape[1], backend="torch")
    loss = lm_loss(model, ids, mask)
    loss.backward()
    for b, r, d in zip(branches, rows, dense):
        assert b.trainable.delta.shape == (len(r), b.pkm.values.shape[1])
        assert b.pkm.values.grad is None
        torch.testing.assert_close(b.trainable.delta.grad, d[r], rtol=1e-5, atol=1e-7)
        assert b.trainable.delta.grad.abs().sum() > 0  # some chosen rows were read


def test_sgd_on_rows_equals_masked_dense_sgd():
    ids, mask = batch(B=3, L=8)
    rows = [torch.tensor([1, 5, 8, 20]), torch.tensor([4, 9])]
    model, branches = setup()
    reference, ref_branches = setup()
    for b, r in zip(branches, rows):
        b.trainable = TrainableSlots(b.num_slots, r, torch.zeros_like(r), b.pkm.values.shape[1], backend="torch")
    opt = torch.optim.SGD([b.trainable.delta for b in branches], lr=0.5)
    for b in ref_branches:
        b.pkm.values.requires_grad_(True)
    ref_opt = torch.optim.SGD([b.pkm.values for b in ref_branches], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, ids, mask).backward()
        opt.step()
        ref_opt.zero_grad()
        lm_loss(reference, ids, mask).backward()
        for b, r in zip(ref_branches, rows):
            keep = torch.zeros(b.num_slots, 1, dtype=torch.bool)
            keep[r] = True
            b.pkm.values.grad.mul_(keep)
        ref_opt.step()
    for b, ref, r in zip(branches, ref_branches, rows):
        merged = b.pkm.values.clone()
        merged[r] += b.trainable.delta.detach()
        torch.testing.assert_close(merged, ref.pkm.values.detach(), rtol=1e-5, atol=1e-6)


def test_tokens_write_only_their_groups_rows():
    model, branches = setup()
    ids, mask = batch(B=2, L=8)
    rows, owners = torch.arange(36), torch.tensor([0, 1] * 18)
    ft = SparseMemoryFinetuning(branches, SlotStats(2, 36), slots_per_group=4)
    for b in branches:
        b.trainable = TrainableSlots(36, rows, owners, b.pkm.values.shape[1], backend="torch")
    # Sequence 0 belongs to group 1: no gradient may reach group 0's rows, and vice versa.
    with ft.token_groups(torch.tensor([1, 5]), mask):
        lm_loss(model, ids, mask).backward()
    assert all(b.trainable.groups is None for b in branches)
    for b in branches:
        g = b.trainable.delta.grad
        assert g[owners == 0].abs().sum() == 0
        assert g[owners == 1].abs().sum() > 0


def test_selection_is_top_tfidf_and_disjoint_across_groups():
    model, branches = setup(num_keys=8)
    bg_ids, bg_mask = batch(B=6, L=10, seed=5)
    background = slot_stats(model, branches, [(bg_ids, bg_mask)])
    ids, mask = batch(B=4, L=9, seed=6)
    groups = torch.tensor([0, 0, 1, 1])
    ft = SparseMemoryFinetuning(branches, background, slots_per_group=5)
    chosen = ft.select(model, ids, mask, groups)
    assert sorted(chosen) == [0, 1]
    flat = [set((chosen[g][:, 0] * 64 + chosen[g][:, 1]).tolist()) for g in (0, 1)]
    assert len(flat[0]) == 5 and len(flat[1]) == 5 and not flat[0] & flat[1]
    # Group 0 (selected first) gets exactly its five best-scoring slots.
    from memlayers.continual import group_slot_stats

    stats = group_slot_stats(model, branches, ids, mask, groups)
    score = tfidf(stats[0], background).reshape(-1)
    best = score.topk(5).values
    assert torch.allclose(torch.sort(score[list(flat[0])]).values, torch.sort(best).values)


def test_phase_trains_only_selected_rows_and_records_them():
    model, branches = setup()
    tables = [b.pkm.values.clone() for b in branches]
    background = slot_stats(model, branches, [batch(B=6, L=10, seed=5)])
    ids, mask = batch(B=4, L=9, seed=6)
    groups = torch.tensor([3, 3, 4, 4])
    ft = SparseMemoryFinetuning(branches, background, slots_per_group=6)
    chosen = ft.begin(model, ids, mask, groups)
    with pytest.raises(ValueError, match="in progress"):
        ft.begin(model, ids, mask, groups)
    opt = torch.optim.Adam(ft.parameters(), lr=0.05)
    assert sum(p.shape[0] for p in ft.parameters()) == 12
    for _ in range(2):
        opt.zero_grad()
        with ft.token_groups(groups, mask):
            lm_loss(model, ids, mask).backward()
        opt.step()
    # Adam keeps state for the trained rows only.
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in ft.parameters())
    written = ft.end()
    assert written > 0 and all(b.trainable is None for b in branches)
    for m, (b, before) in enumerate(zip(branches, tables)):
        changed = (b.pkm.values != before).any(1).nonzero().flatten()
        allowed = torch.cat([chosen[g][chosen[g][:, 0] == m, 1] for g in (3, 4)])
        assert set(changed.tolist()) <= set(allowed.tolist())
    recorded = sum(r.numel() for g in ft.ledger.groups for r in ft.ledger.slots(g).values())
    assert recorded == written
    with pytest.raises(ValueError, match="no sparse fine-tuning phase"):
        ft.end()
    with pytest.raises(ValueError, match="slots_per_group"):
        SparseMemoryFinetuning(branches, background, slots_per_group=0)
