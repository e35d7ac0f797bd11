"""generate() with memory matches a full-context greedy generation."""
import pytest
import torch

import memlayers.hf as mm

from hf_tiny import VOCAB, tiny_model


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_greedy_generation_with_memory_matches_full_context(family):
    model = tiny_model(family)
    ids = torch.randint(1, VOCAB, (2, 70))
    greedy = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    full = model.generate(ids, **greedy)[:, 70:]
    mm.attach(model, mm.KNNMemoryConfig(top_k=64, backend="torch"))
    mm.memorize(model, ids[:, :50], chunk_size=16)
    out = model.generate(ids[:, 50:], **greedy)[:, 20:]
    assert torch.equal(out, full)
    # The continuation alone (no memory) generates something else: the comparison can fail.
    mm.reset_memory(model)
    assert not torch.equal(model.generate(ids[:, 50:], **greedy)[:, 20:], full)


def test_generate_rejects_a_batch_other_than_the_memorized_one():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 30))
    mm.attach(model, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    mm.memorize(model, ids, chunk_size=16)
    with pytest.raises(ValueError, match="batch rows"):
        model.generate(ids[:, :5], max_new_tokens=2, do_sample=False, num_return_sequences=2, num_beams=2)
