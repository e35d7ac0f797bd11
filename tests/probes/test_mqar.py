import math

import pytest
import torch
from torch import nn

from memlayers.probes import MQARModel, evaluate_mqar, mqar_data, train_mqar
from probe_fixtures import make_causal_attention, make_induction_head


def test_mqar_format():
    V, T, K = 128, 64, 6
    d = mqar_data(32, T, V, K, seed=1)
    assert d.inputs.shape == d.labels.shape == (32, T) and d.inputs.dtype == torch.int64
    keys, values = d.inputs[:, 0 : 2 * K : 2], d.inputs[:, 1 : 2 * K : 2]
    assert bool(((keys >= 1) & (keys < V // 2)).all()) and bool(((values >= V // 2) & (values < V)).all())
    for n in range(32):
        assert len(set(keys[n].tolist())) == K
        asked = (d.labels[n] != -100).nonzero().flatten()
        assert len(asked) == K
        for j in range(K):
            p = int(d.query_positions[n, j])
            # key j is asked at p and the label there is its value
            assert d.inputs[n, p] == keys[n, j] and d.labels[n, p] == values[n, j]
            assert d.distances[n, j] == p - 2 * j and p >= 2 * K
    again = mqar_data(32, T, V, K, seed=1)
    assert torch.equal(again.inputs, d.inputs) and torch.equal(again.labels, d.labels)
    assert not torch.equal(mqar_data(32, T, V, K, seed=2).inputs, d.inputs)


def test_power_law_gaps_favour_short_distances():
    d = mqar_data(256, 256, 512, 8, seed=0)
    gaps = (d.query_positions - 16) // 2
    assert (gaps < 30).float().mean() > (gaps >= 90).float().mean()


def test_induction_head_recalls_everything():
    """A module that truly does associative recall scores 1.0 through the embeddings path."""
    V, dim = 256, 128
    table = nn.functional.normalize(torch.randn(V, dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    data = mqar_data(64, 128, V, 8, random_non_queries=False)
    res = evaluate_mqar(make_induction_head(dim), data, embedding=table, batch_size=16)
    assert res.accuracy == 1.0 and res.total == 64 * 8
    assert set(res.by_distance.values()) == {1.0}
    # a module that ignores its input is at chance among V/2 values
    blind = evaluate_mqar(nn.Linear(dim, dim), mqar_data(64, 128, V, 8), embedding=table)
    assert blind.accuracy < 0.1


def test_training_a_small_attention_model_learns():
    torch.manual_seed(0)
    V, T, K, dim = 32, 16, 2, 32
    model = MQARModel([make_causal_attention(dim), make_causal_attention(dim)], V, dim)
    before = evaluate_mqar(model, mqar_data(128, T, V, K, seed=0)).accuracy
    losses = train_mqar(model, vocab_size=V, seq_len=T, num_kv_pairs=K, steps=60, batch_size=32, lr=3e-3)
    after = evaluate_mqar(model, mqar_data(128, T, V, K, seed=0)).accuracy
    # measured: loss 3.3 -> 2.1, accuracy 0.04 -> 0.38 (chance among 16 values: 0.06)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5
    assert after > before + 0.15


def test_neural_memory_module_if_available():
    nm = pytest.importorskip("memlayers.layers.neural_memory")
    try:  # the plain-PyTorch path: the Triton interpreter would only make this test slow
        mem = nm.NeuralMemory(32, heads=2, chunk_size=8, backend="torch")
    except TypeError as e:  # its constructor is the issue-4 engineer's; adapt when it settles
        pytest.skip(f"NeuralMemory could not be built: {e}")
    torch.manual_seed(0)
    model = MQARModel(mem, 64, 32)
    data = mqar_data(16, 32, 64, 4)
    res = evaluate_mqar(model, data, batch_size=8)
    assert res.total == 64 and res.correct == round(res.accuracy * 64)
    # the memory is trainable end to end inside the harness
    losses = train_mqar(model, vocab_size=64, seq_len=32, num_kv_pairs=4, steps=8, batch_size=8, lr=3e-3)
    assert all(map(math.isfinite, losses)) and sum(losses[-3:]) < sum(losses[:3])


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        (dict(seq_len=63), ValueError, "seq_len"),
        (dict(vocab_size=64), ValueError, "vocab_size"),
        (dict(num_kv_pairs=17), ValueError, "num_kv_pairs"),
        (dict(power_a=0.0), ValueError, "power_a"),
        (dict(num_examples=0), ValueError, "num_examples"),
        (dict(seed=1.5), TypeError, "seed"),
    ],
)
def test_mqar_data_bad_input(kwargs, exc, word):
    args = dict(num_examples=4, seq_len=64, vocab_size=128, num_kv_pairs=4)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        mqar_data(**args)


def test_evaluate_bad_input():
    data = mqar_data(4, 32, 64, 4)
    table = torch.randn(64, 16)
    with pytest.raises(ValueError, match="model output"):
        evaluate_mqar(nn.Identity(), data)  # ids in, ids out: not logits
    with pytest.raises(ValueError, match="model output"):
        evaluate_mqar(nn.Linear(16, 8), data, embedding=table)
    bad = table.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="embedding"):
        evaluate_mqar(nn.Identity(), data, embedding=bad)
    with pytest.raises(ValueError, match="embedding"):
        evaluate_mqar(nn.Identity(), data, embedding=torch.randn(10, 16))
    with pytest.raises(TypeError, match="data"):
        evaluate_mqar(nn.Identity(), data.inputs)
    with pytest.raises(ValueError, match="mixer"):
        MQARModel(nn.Linear(16, 8), 64, 16)(data.inputs)
    with pytest.raises(TypeError, match="ids"):
        MQARModel(nn.Identity(), 64, 16)(data.inputs.float())


def test_train_bad_input():
    model = MQARModel(nn.Identity(), 64, 16)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="lr"):
        train_mqar(model, vocab_size=64, seq_len=32, num_kv_pairs=4, lr=float("nan"))
    with pytest.raises(ValueError, match="steps"):
        train_mqar(model, vocab_size=64, seq_len=32, num_kv_pairs=4, steps=0)
    with pytest.raises(TypeError, match="model"):
        train_mqar("model", vocab_size=64, seq_len=32, num_kv_pairs=4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
