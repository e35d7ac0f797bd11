"""Slot access statistics: counts and document frequencies equal a brute-force count; TF-IDF formula."""
import math

import pytest
import torch

from memlayers.continual import SlotStats, group_slot_stats, recording, slot_stats, tfidf
import memlayers as ml
from memlayers.hf import PKMConfig
from memlayers.hf.pkm_branch import pkm_branches

from conftest import batch, tiny_llama


def brute_force(indices, valid, V):
    counts, docs = [0] * V, [0] * V
    for b in range(valid.shape[0]):
        seen = set()
        for t in range(valid.shape[1]):
            if valid[b, t]:
                for i in indices[b, t].tolist():
                    counts[i] += 1
                    seen.add(i)
        for i in seen:
            docs[i] += 1
    return torch.tensor(counts), torch.tensor(docs)


def test_update_counts_lookups_and_documents():
    g = torch.Generator().manual_seed(0)
    V, B, L, K = 13, 4, 6, 5
    idx = [torch.randint(0, V, (B, L, K), generator=g) for _ in range(2)]
    valid = torch.rand(B, L, generator=g) > 0.3
    valid[3] = False  # a sequence with nothing to count is no document
    stats = SlotStats(2, V)
    stats.update(idx, valid)
    stats.update(idx, valid)
    for m in range(2):
        counts, docs = brute_force(idx[m], valid, V)
        assert torch.equal(stats.counts[m], 2 * counts)
        assert torch.equal(stats.docs[m], 2 * docs)
    assert stats.num_docs == 2 * 3
    with pytest.raises(ValueError, match="one tensor per memory"):
        stats.update(idx[:1], valid)
    with pytest.raises(TypeError, match="valid"):
        stats.update(idx, valid.long())


def test_tfidf_formula():
    new, bg = SlotStats(1, 4), SlotStats(1, 4)
    new.counts[0] = torch.tensor([3, 1, 0, 4])
    bg.docs[0] = torch.tensor([9, 0, 2, 4])
    bg.num_docs = 9
    score = tfidf(new, bg)[0]
    expect = [3 / 8 * math.log(10 / 10), 1 / 8 * math.log(10 / 1), 0.0, 4 / 8 * math.log(10 / 5)]
    assert torch.allclose(score, torch.tensor(expect), rtol=1e-6)
    # The slot every background document reads scores 0 however often the new data reads it.
    assert score[0] == 0 and score.argmax() == 3
    with pytest.raises(ValueError, match="background"):
        tfidf(new, SlotStats(2, 4))


def test_model_statistics_match_the_recorded_reads_and_split_by_group():
    model = tiny_llama()
    branches = pkm_branches(ml.attach(model, PKMConfig(layers=[0, 2], heads=2, num_keys=5, top_k=3)))
    ids, mask = batch(B=4, L=9)
    with recording(branches) as recorded, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    total = slot_stats(model, branches, [(ids, mask)])
    for m in range(2):
        counts, docs = brute_force(recorded[m][0].view(4, 9, -1), mask.bool(), 25)
        assert torch.equal(total.counts[m], counts) and torch.equal(total.docs[m], docs)
    groups = torch.tensor([7, 2, 7, 2])
    per_group = group_slot_stats(model, branches, ids, mask, groups)
    assert sorted(per_group) == [2, 7]
    assert per_group[7].num_docs == 2
    merged = SlotStats(2, 25).merge_(per_group[2]).merge_(per_group[7])
    assert torch.equal(merged.counts, total.counts) and torch.equal(merged.docs, total.docs)
