"""NeuralMemory: state across calls (pieces == one call, single tokens), Miras options, bad input."""
import pytest
import torch

from memlayers.layers.neural_memory import NeuralMemory, NeuralMemoryState
from memlayers.ops.utils.testing import assert_rel_close


def pieces_out(mem, x, sizes):
    state, ys = None, []
    start = 0
    for n in sizes:
        y, state = mem(x[:, start:start + n], state)
        ys.append(y)
        start += n
    assert start == x.shape[1]
    return torch.cat(ys, dim=1), state


@pytest.mark.parametrize("memory,bias,momentum,forget", [
    ("linear", "l2", True, True),
    ("mlp", "huber", True, False),
    ("mlp", "lp", False, True),
])
def test_pieces_equal_one_call(memory, bias, momentum, forget):
    mem = NeuralMemory(32, heads=2, memory=memory, chunk_size=16, bias=bias, momentum=momentum,
                       forget=forget, max_lr=0.1, backend="torch")
    x = torch.randn(2, 53, 32)
    with torch.no_grad():
        ref, ref_state = mem(x)
        out, state = pieces_out(mem, x, [5, 1, 20, 3, 16, 8])
    assert_rel_close(out, ref, 1e-5, "pieces vs one call")
    for a, b in zip(state.weights, ref_state.weights):
        assert_rel_close(a, b, 1e-5, "final memory")
    assert state.seen == 53


def test_single_token_steps_equal_one_call():
    mem = NeuralMemory(32, heads=2, memory="mlp", chunk_size=16, max_lr=0.1, backend="torch")
    x = torch.randn(1, 35, 32)
    with torch.no_grad():
        ref, _ = mem(x)
        out, state = pieces_out(mem, x, [1] * 35)
    assert_rel_close(out, ref, 1e-5, "token steps vs one call")
    assert state.pending[0].shape[2] == 35 % 16


def test_memory_learns_at_test_time():
    # Repeating a sequence: the second pass retrieves differently because the memory has learned.
    mem = NeuralMemory(32, heads=2, memory="linear", chunk_size=16, max_lr=0.5, backend="torch")
    x = torch.randn(1, 32, 32)
    with torch.no_grad():
        y1, state = mem(x)
        y2, _ = mem(x, state)
    assert (y1 - y2).abs().max() > 1e-2


def test_miras_options_change_the_result():
    torch.manual_seed(0)
    x = torch.randn(1, 40, 32)
    outs = {}
    for bias in ("l2", "lp", "huber"):
        torch.manual_seed(1)
        mem = NeuralMemory(32, heads=2, memory="linear", chunk_size=16, bias=bias, p=4.0, delta=0.05,
                           max_lr=0.5, backend="torch")
        with torch.no_grad():
            outs[bias] = mem(x)[0]
    assert (outs["l2"] - outs["lp"]).abs().max() > 1e-4
    assert (outs["l2"] - outs["huber"]).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    mem = NeuralMemory(32, heads=2, memory="mlp", chunk_size=16, backend="torch")
    y, state = mem(torch.randn(2, 40, 32))
    (y.square().mean() + state.weights[0].sum()).backward()
    for name, prm in mem.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_triton_path_matches_torch_path(memory):
    torch.manual_seed(0)
    mem = NeuralMemory(32, heads=2, memory=memory, chunk_size=16, max_lr=0.1)
    x = torch.randn(1, 37, 32, requires_grad=True)
    mem.backend = "torch"
    ref, _ = mem(x)
    g_ref = torch.autograd.grad(ref.square().sum(), [x] + list(mem.parameters()))
    mem.backend = "triton"
    out, _ = mem(x)
    g_out = torch.autograd.grad(out.square().sum(), [x] + list(mem.parameters()))
    assert_rel_close(out, ref, 1e-5, "y")
    for a, b in zip(g_out, g_ref):
        assert_rel_close(a, b, 1e-4, "grad")


def test_16k_tokens_default_init_finite():
    # Default gates and chunk size; small width keeps the torch path quick on CPU.
    mem = NeuralMemory(32, heads=2, memory="mlp", backend="torch")
    with torch.no_grad():
        y, state = mem(torch.randn(1, 16384, 32))
    assert torch.isfinite(y).all() and all(torch.isfinite(w).all() for w in state.weights)
    assert y[:, -2048:].abs().max() < 50


def test_bad_input_is_rejected_before_state_changes():
    mem = NeuralMemory(32, heads=2, chunk_size=16, backend="torch")
    with torch.no_grad():
        _, state = mem(torch.randn(2, 10, 32))
    snapshot = [w.clone() for w in state.weights]
    with pytest.raises(ValueError, match="x"):
        mem(torch.randn(2, 10, 31), state)
    with pytest.raises(ValueError, match="x"):
        mem(torch.randn(10, 32), state)
    with pytest.raises(TypeError, match="x"):
        mem(torch.randn(2, 10, 32, dtype=torch.float64), state)
    with pytest.raises(TypeError, match="x"):
        mem([[1.0]], state)
    bad = torch.randn(2, 10, 32)
    bad[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mem(bad, state)
    with pytest.raises(ValueError, match="batch size"):
        mem(torch.randn(3, 10, 32), state)
    with pytest.raises(TypeError, match="state"):
        mem(torch.randn(2, 10, 32), "state")
    for a, b in zip(state.weights, snapshot):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="memory"):
        NeuralMemory(32, memory="deep")
    with pytest.raises(ValueError, match="bias"):
        NeuralMemory(32, bias="l3")
    with pytest.raises(ValueError, match="depth"):
        NeuralMemory(32, memory="mlp", depth=1)
    with pytest.raises(TypeError, match="chunk_size"):
        NeuralMemory(32, chunk_size=16.0)
