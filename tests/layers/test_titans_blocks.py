"""TitansMAC / MAG / MAL: causality, long-range information through the memory, persistent tokens, bad input,
training on the Triton backend."""
import os

import pytest
import torch

from memlayers.layers.titans import TitansMAC, TitansMAG, TitansMAL

MEM = dict(chunk_size=16, max_lr=0.5, backend="torch")


def make(kind):
    if kind == "mac":
        return TitansMAC(32, heads=2, segment_len=16, n_persist=3, memory_kwargs=MEM)
    cls = TitansMAG if kind == "mag" else TitansMAL
    return cls(32, heads=2, window=8, n_persist=3, memory_kwargs=MEM)


@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_causal(kind):
    block = make(kind)
    x = torch.randn(2, 45, 32)
    x2 = x.clone()
    x2[:, 30:] += torch.randn(2, 15, 32)
    with torch.no_grad():
        a, b = block(x), block(x2)
    assert a.shape == x.shape
    assert torch.allclose(a[:, :30], b[:, :30], atol=1e-6)
    assert (a[:, 30:] - b[:, 30:]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_information_beyond_attention_reaches_through_memory(kind):
    # MAC attends within a segment (16), MAG/MAL within a window (8): token 2 is out of their reach
    # at position 40, so any effect there comes through the neural memory.
    block = make(kind)
    x = torch.randn(1, 41, 32)
    x2 = x.clone()
    x2[:, 2] += 3.0
    with torch.no_grad():
        assert (block(x)[:, 40] - block(x2)[:, 40]).abs().max() > 1e-5
        # A memory that cannot learn (theta = max_lr * sigmoid(-1000) = 0) carries nothing forward.
        block.memory.to_gates.bias[: block.memory.heads] = -1000.0
        assert torch.equal(block(x)[:, 40], block(x2)[:, 40])


def test_mac_reads_memory_before_attention():
    # The first segment reads the learned initial memory: its output depends on init_weights.
    block = make("mac")
    x = torch.randn(1, 16, 32)
    out = block(x)
    grads = torch.autograd.grad(out.sum(), [block.memory.init_weights[0], block.persistent])
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_bad_input(kind):
    block = make(kind)
    with pytest.raises(ValueError, match="x"):
        block(torch.randn(1, 5, 31))
    with pytest.raises(TypeError, match="x"):
        block(torch.randn(1, 5, 32, dtype=torch.float64))
    bad = torch.randn(1, 5, 32)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        block(bad)


def test_zero_length_sequences_give_empty_outputs():
    """Issue 14: T=0 is an empty output of the right shape (and, for NeuralMemory, the state unchanged)."""
    import memlayers as ml

    x = torch.randn(2, 0, 16, requires_grad=True)
    nm = ml.NeuralMemory(16, heads=2, chunk_size=4, backend="torch")
    y, state = nm(x, return_state=True)
    assert y.shape == (2, 0, 16) and state.seen == 0 and nm.read(x, state).shape == (2, 0, 16)
    assert ml.TitansMAC(16, heads=2, segment_len=4)(x).shape == (2, 0, 16)
    pkm = ml.ProductKeyMemory(dim=16, num_keys=4, top_k=2, backend="torch")
    assert pkm(x).shape == (2, 0, 16)
    pkm(x).sum().backward()
    assert x.grad.shape == (2, 0, 16)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("kind", ["mac", "mag", "mal"])
def test_training_steps_on_the_triton_backend_equal_torch(kind):
    # Issue 13: SGD steps through the Titans kernels (MAC carries the memory across its segments).
    torch.manual_seed(0)
    ref = make(kind)
    tri = make(kind)
    tri.load_state_dict(ref.state_dict())
    tri.memory.backend = "triton"
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (ref, tri)]
    for step in range(2):
        x = torch.randn(2, 37, 32)
        grads = []
        for model, opt in zip((ref, tri), opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        for name, g in grads[0].items():
            assert (g - grads[1][name]).norm() <= 1e-4 * g.norm() + 1e-7, (step, name)
        assert grads[0]["memory.to_qkv.weight"].abs().sum() > 0
