"""What real use needs: generate() writing into memory (opt-in), padded batches in memorize."""
import copy

import pytest
import torch

import memlayers.hf as mm
from memlayers.hf.memorize import writing
from memlayers.hf.state import memory_wrappers, positions_of

from hf_tiny import VOCAB, logits, tiny_model

GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def _pair(family, *configs):
    """Two copies of one tiny model with the same memories attached (Titans branches start random)."""
    a = mm.attach(tiny_model(family), list(configs))
    return a, copy.deepcopy(a)


def _assert_same_memories(a, b):
    wa, wb = memory_wrappers(a, ("knn", "titans")), memory_wrappers(b, ("knn", "titans"))
    assert len(wa) == len(wb) > 0
    for x, y in zip(wa, wb):
        if x.attachment_kind == "knn":
            assert torch.equal(x.memory.count, y.memory.count)
            assert torch.equal(x.memory.positions, y.memory.positions)
            torch.testing.assert_close(x.memory.keys, y.memory.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(x.memory.values, y.memory.values, atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(x.titans_memory.seen, y.titans_memory.seen)
            torch.testing.assert_close(x.titans_memory.weights_0, y.titans_memory.weights_0, atol=1e-5, rtol=1e-4)
    if positions_of(a) is not None:
        assert torch.equal(positions_of(a).offset, positions_of(b).offset)
        assert positions_of(a).memorized == positions_of(b).memorized


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_generate_writes_prompt_and_generated_tokens_like_memorize(family):
    knn = mm.KNNMemoryConfig(top_k=8, backend="torch")
    titans = mm.TitansMemoryConfig(layers=[1], chunk_size=4, backend="torch")
    a, b = _pair(family, knn, titans)
    ids = torch.randint(1, VOCAB, (2, 31))
    context, prompt = ids[:, :21], ids[:, 21:]
    for m in (a, b):
        mm.memorize(m, context, chunk_size=8)
    with writing(a):
        out = a.generate(prompt, max_new_tokens=7, **GREEDY)
    # The block stored what generate read (the last sampled token is never read) after the context.
    read = out[:, :-1]
    mm.memorize(b, read, chunk_size=64)
    _assert_same_memories(a, b)
    assert positions_of(a).memorized == 21 + read.shape[1]
    rest = torch.randint(1, VOCAB, (2, 5))
    torch.testing.assert_close(logits(a, rest), logits(b, rest), atol=1e-4, rtol=1e-4)


def test_generate_writes_nothing_by_default_and_reads_the_opening_memory():
    a, b = _pair("llama", mm.KNNMemoryConfig(top_k=8, backend="torch"))
    ids = torch.randint(1, VOCAB, (1, 30))
    for m in (a, b):
        mm.memorize(m, ids[:, :20], chunk_size=8)
    plain = a.generate(ids[:, 20:], max_new_tokens=6, **GREEDY)
    _assert_same_memories(a, b)  # generate outside a block changed nothing
    with writing(b):
        written = b.generate(ids[:, 20:], max_new_tokens=6, **GREEDY)
    assert torch.equal(plain, written)  # inside the block the memory is read as it was
    assert positions_of(b).memorized == 20 + 15 > positions_of(a).memorized


def test_writing_into_an_empty_memory_and_an_exception_stores_nothing():
    a, b = _pair("llama", mm.KNNMemoryConfig(top_k=8, backend="torch"))
    prompt = torch.randint(1, VOCAB, (2, 9))
    with pytest.raises(RuntimeError, match="stop"):
        with writing(a):
            a.generate(prompt, max_new_tokens=3, **GREEDY)
            raise RuntimeError("stop")
    assert all(w.memory is None for w in memory_wrappers(a, ("knn",)))
    with writing(a):
        out = a.generate(prompt, max_new_tokens=4, **GREEDY)
    mm.memorize(b, out[:, :-1], chunk_size=64)
    _assert_same_memories(a, b)


def test_writing_blocks_do_not_nest():
    model = tiny_model("llama")
    mm.attach(model, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    with writing(model):
        with pytest.raises(ValueError, match="already open"):
            with writing(model):
                pass
