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
    # Not the first layer: in a rotary model its stored keys depend on the token alone, so a repeated
    # token stores equal keys, a top-k tie that decode's search and a chunk's search may break
    # differently (both right), reading the tied slots at different distances.
    knn = mm.KNNMemoryConfig(layers=[1], top_k=8, backend="torch")
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


def _padded(rows, side):
    """``rows`` (1-D id tensors) padded with 0 on ``side`` into ``(input_ids, attention_mask)``."""
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for b, r in enumerate(rows):
        cols = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[b, cols], mask[b, cols] = r, 1
    return ids, mask


@pytest.mark.parametrize("family,side", [("qwen2", "left"), ("gpt2", "right")])
def test_padded_batch_equals_memorizing_each_row_on_its_own(family, side):
    knn = mm.KNNMemoryConfig(top_k=8, backend="torch")
    titans = mm.TitansMemoryConfig(layers=[0], chunk_size=4, backend="torch")
    batch, _ = _pair(family, knn, titans)
    singles = [copy.deepcopy(batch) for _ in range(2)]
    docs = [torch.randint(1, VOCAB, (23,)), torch.randint(1, VOCAB, (14,))]
    ids, mask = _padded(docs, side)
    # Twice: the second call continues each row after its own tokens.
    for _ in range(2):
        mm.memorize(batch, ids, chunk_size=8, attention_mask=mask)
        for single, doc in zip(singles, docs):
            mm.memorize(single, doc[None], chunk_size=8)
    assert positions_of(batch).offset.tolist() == [46, 28]
    rest = torch.randint(1, VOCAB, (2, 5))
    out = logits(batch, rest)
    for b, single in enumerate(singles):
        torch.testing.assert_close(out[b:b + 1], logits(single, rest[b:b + 1]), atol=1e-4, rtol=1e-4)
        for x, y in zip(memory_wrappers(batch, ("knn",)), memory_wrappers(single, ("knn",))):
            assert torch.equal(x.memory.count[b:b + 1], y.memory.count)
            assert torch.equal(x.memory.positions[b:b + 1], y.memory.positions)
    # Padding memorized as tokens would give other logits: the comparison can fail.
    unmasked = copy.deepcopy(singles[1])
    mm.reset_memory(unmasked)
    mm.memorize(unmasked, ids[1:], chunk_size=8)
    mm.memorize(unmasked, ids[1:], chunk_size=8)
    assert not torch.allclose(logits(unmasked, rest[1:]), out[1:], atol=1e-3)


def test_padded_memorize_rejects_a_mask_of_other_values_before_any_change():
    model = tiny_model("llama")
    mm.attach(model, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    ids = torch.randint(1, VOCAB, (2, 10))
    with pytest.raises(ValueError, match="attention_mask"):
        mm.memorize(model, ids, attention_mask=torch.full((2, 10), 2))
    assert all(w.memory is None for w in memory_wrappers(model, ("knn",)))


def test_padded_memorize_checks_learned_positions_per_row():
    model = tiny_model("gpt2", max_position_embeddings=40)
    mm.attach(model, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    ids, mask = _padded([torch.randint(1, VOCAB, (30,)), torch.randint(1, VOCAB, (6,))], "right")
    mm.memorize(model, ids, chunk_size=16, attention_mask=mask)
    # Row 1 fits (6 + 30 <= 40) but row 0 would reach 60: refused, nothing changed.
    longer, mask2 = _padded([torch.randint(1, VOCAB, (30,)), torch.randint(1, VOCAB, (2,))], "right")
    with pytest.raises(ValueError, match="learned positions"):
        mm.memorize(model, longer, chunk_size=16, attention_mask=mask2)
    assert positions_of(model).offset.tolist() == [30, 6]
    # The same tokens swapped between rows fit: each row is checked against its own offset.
    mm.memorize(model, longer.flip(0), chunk_size=16, attention_mask=mask2.flip(0))
    assert positions_of(model).offset.tolist() == [32, 36]


def test_a_padded_memorize_that_fails_midway_leaves_every_memory_as_it_was(monkeypatch):
    import sys

    memorize_module = sys.modules["memlayers.hf.memorize"]  # the package's ``memorize`` is the function
    model, before = _pair("llama", mm.KNNMemoryConfig(top_k=8, backend="torch"),
                          mm.TitansMemoryConfig(layers=[1], chunk_size=4, backend="torch"))
    ids, mask = _padded([torch.randint(1, VOCAB, (12,)), torch.randint(1, VOCAB, (7,))], "left")
    for m in (model, before):
        mm.memorize(m, ids, chunk_size=8, attention_mask=mask)
    one_row = memorize_module.memorize
    calls = []

    def fail_on_the_second_row(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return one_row(*args, **kwargs)

    monkeypatch.setattr(memorize_module, "memorize", fail_on_the_second_row)
    with pytest.raises(RuntimeError, match="interrupted"):
        one_row(model, ids, chunk_size=8, attention_mask=mask)
    assert len(calls) == 2  # row 0 was memorized before the failure
    _assert_same_memories(model, before)
