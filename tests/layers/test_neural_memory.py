"""NeuralMemory: state across calls (pieces == one call, single tokens), Miras options, bad input,
the return convention; StatefulNeuralMemory: state in buffers, exact per-row reset, state_dict."""
import pytest
import torch

from memlayers.layers.neural_memory import NeuralMemory, NeuralMemoryState, StatefulNeuralMemory
from memlayers.ops.utils.testing import assert_rel_close


def pieces_out(mem, x, sizes):
    state, ys = None, []
    start = 0
    for n in sizes:
        y, state = mem(x[:, start:start + n], state, return_state=True)
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
        ref, ref_state = mem(x, return_state=True)
        out, state = pieces_out(mem, x, [5, 1, 20, 3, 16, 8])
    assert_rel_close(out, ref, 1e-5, "pieces vs one call")
    for a, b in zip(state.weights, ref_state.weights):
        assert_rel_close(a, b, 1e-5, "final memory")
    assert state.seen == 53


def test_single_token_steps_equal_one_call():
    mem = NeuralMemory(32, heads=2, memory="mlp", chunk_size=16, max_lr=0.1, backend="torch")
    x = torch.randn(1, 35, 32)
    with torch.no_grad():
        ref = mem(x, return_state=False)
        out, state = pieces_out(mem, x, [1] * 35)
    assert_rel_close(out, ref, 1e-5, "token steps vs one call")
    assert state.pending[0].shape[2] == 35 % 16


def test_memory_learns_at_test_time():
    # Repeating a sequence: the second pass retrieves differently because the memory has learned.
    mem = NeuralMemory(32, heads=2, memory="linear", chunk_size=16, max_lr=0.5, backend="torch")
    x = torch.randn(1, 32, 32)
    with torch.no_grad():
        y1, state = mem(x, return_state=True)
        y2 = mem(x, state, return_state=False)
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
            outs[bias] = mem(x, return_state=False)
    assert (outs["l2"] - outs["lp"]).abs().max() > 1e-4
    assert (outs["l2"] - outs["huber"]).abs().max() > 1e-4


def test_gradients_reach_every_parameter():
    mem = NeuralMemory(32, heads=2, memory="mlp", chunk_size=16, backend="torch")
    y, state = mem(torch.randn(2, 40, 32), return_state=True)
    (y.square().mean() + state.weights[0].sum()).backward()
    for name, prm in mem.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_triton_path_matches_torch_path(memory):
    torch.manual_seed(0)
    mem = NeuralMemory(32, heads=2, memory=memory, chunk_size=16, max_lr=0.1)
    x = torch.randn(1, 37, 32, requires_grad=True)
    mem.backend = "torch"
    ref = mem(x, return_state=False)
    g_ref = torch.autograd.grad(ref.square().sum(), [x] + list(mem.parameters()))
    mem.backend = "triton"
    out = mem(x, return_state=False)
    g_out = torch.autograd.grad(out.square().sum(), [x] + list(mem.parameters()))
    assert_rel_close(out, ref, 1e-5, "y")
    for a, b in zip(g_out, g_ref):
        assert_rel_close(a, b, 1e-4, "grad")


def test_16k_tokens_default_init_finite():
    # Default gates and chunk size; small width keeps the torch path quick on CPU.
    mem = NeuralMemory(32, heads=2, memory="mlp", backend="torch")
    with torch.no_grad():
        y, state = mem(torch.randn(1, 16384, 32), return_state=True)
    assert torch.isfinite(y).all() and all(torch.isfinite(w).all() for w in state.weights)
    assert y[:, -2048:].abs().max() < 50


def test_bad_input_is_rejected_before_state_changes():
    mem = NeuralMemory(32, heads=2, chunk_size=16, backend="torch")
    with torch.no_grad():
        _, state = mem(torch.randn(2, 10, 32), return_state=True)
    snapshot = [w.clone() for w in state.weights]
    with pytest.raises(ValueError, match="x"):
        mem(torch.randn(2, 10, 31), state, return_state=False)
    with pytest.raises(ValueError, match="x"):
        mem(torch.randn(10, 32), state, return_state=False)
    with pytest.raises(TypeError, match="x"):
        mem(torch.randn(2, 10, 32, dtype=torch.float64), state, return_state=False)
    with pytest.raises(TypeError, match="x"):
        mem([[1.0]], state, return_state=False)
    bad = torch.randn(2, 10, 32)
    bad[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        mem(bad, state, return_state=False)
    with pytest.raises(ValueError, match="batch size"):
        mem(torch.randn(3, 10, 32), state, return_state=False)
    with pytest.raises(TypeError, match="state"):
        mem(torch.randn(2, 10, 32), "state", return_state=False)
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


def test_return_state_on_request_and_the_old_convention_warns():
    mem = NeuralMemory(32, heads=2, chunk_size=16, backend="torch")
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        y = mem(x, return_state=False)
        y2, state = mem(x, return_state=True)
        with pytest.warns(DeprecationWarning, match="return_state"):
            y3, state3 = mem(x)
    assert isinstance(y, torch.Tensor) and torch.equal(y, y2) and torch.equal(y, y3)
    assert isinstance(state, NeuralMemoryState) and state3.seen == state.seen == 21


def _stateful(chunk_size=16, conv_size=4, **kw):
    torch.manual_seed(0)
    return StatefulNeuralMemory(NeuralMemory(32, heads=2, memory="mlp", chunk_size=chunk_size, max_lr=0.3,
                                             conv_size=conv_size, backend="torch", **kw))


@pytest.mark.parametrize("lengths", [(21, 7, 13), (16, 16, 5), (3, 30, 17)])
def test_stateful_row_reset_is_a_fresh_start_whatever_the_history(lengths):
    # Row 1 memorizes A then B, is reset, then memorizes C: it must equal a memory that read only C,
    # whatever the lengths (unfinished chunks pending at the reset); row 0 must equal one call on A+B+C.
    la, lb, lc = lengths
    smem = _stateful()
    nm = smem.neural_memory
    x = torch.randn(2, la + lb + lc, 32)
    a, b, c = x[:, :la], x[:, la:la + lb], x[:, la + lb:]
    with torch.no_grad():
        smem(a)
        smem(b)
        smem.reset_memory(rows=[1])
        out = smem(c)
        ref0, state0 = nm(x[:1], return_state=True)
        ref1, state1 = nm(c[1:], return_state=True)
    assert_rel_close(out[:1], ref0[:, la + lb:], 1e-5, "row 0 (never reset)")
    assert_rel_close(out[1:], ref1, 1e-5, "row 1 (reset, then C)")
    for i, (w0, w1) in enumerate(zip(state0.weights, state1.weights)):
        assert_rel_close(getattr(smem, f"weights_{i}")[0], w0[0], 1e-5, "row 0 memory")
        assert_rel_close(getattr(smem, f"weights_{i}")[1], w1[0], 1e-5, "row 1 memory")
    assert smem.seen.tolist() == [la + lb + lc, lc]
    assert smem.pending_len.tolist() == [(la + lb + lc) % 16, lc % 16]


def test_stateful_read_changes_nothing_and_pieces_equal_one_call():
    smem = _stateful()
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        ys = [smem(x[:, s:e]) for s, e in ((0, 5), (5, 6), (6, 30), (30, 37))]
        before = {k: v.clone() for k, v in smem.state_dict().items()}
        y_read = smem(x[:, :3], learn=False)
        ref, state = smem.neural_memory(x, return_state=True)
        ref_read = smem.neural_memory.read(x[:, :3], state)
    assert_rel_close(torch.cat(ys, 1), ref, 1e-5, "pieces vs one call")
    assert_rel_close(y_read, ref_read, 1e-5, "read")
    assert all(torch.equal(v, smem.state_dict()[k]) for k, v in before.items())


def test_stateful_state_dict_round_trip_moves_and_saves_without_shared_storage(tmp_path):
    from safetensors.torch import load_file, save_file

    smem = _stateful()
    x = torch.randn(3, 32, 32)  # a multiple of chunk_size: nothing pending
    with torch.no_grad():
        smem(x)
    sd = smem.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "s.safetensors"))  # no shared storage
    other = _stateful()  # no rows bound: takes the saved batch size
    assert other.memory_batch_size is None
    other.load_state_dict(load_file(str(tmp_path / "s.safetensors")))
    assert other.memory_batch_size == 3
    nxt = torch.randn(3, 9, 32)
    with torch.no_grad():
        assert torch.equal(other(nxt), smem(nxt))
    moved = other.to(torch.float64)
    assert moved.weights_0.dtype == torch.float64 and moved.pending_k.dtype == torch.float64
    with torch.no_grad():  # a module cast to bf16 keeps learning (memories computed in fp32)
        half = _stateful().to(torch.bfloat16)
        assert half(nxt.bfloat16()).dtype == torch.bfloat16 and bool(half.weights_0.isfinite().all())
    bad = dict(sd, pending_len=torch.full((3,), 16))
    fresh = _stateful()
    with pytest.raises(RuntimeError, match="pending_len"):
        fresh.load_state_dict(bad)
    assert fresh.memory_batch_size is None  # a failed load changes nothing


def test_stateful_bad_input_changes_nothing():
    smem = _stateful()
    with torch.no_grad():
        smem(torch.randn(2, 10, 32))
    before = {k: v.clone() for k, v in smem.state_dict().items()}
    bad = torch.randn(2, 5, 32)
    bad[0, 1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        smem(bad)
    with pytest.raises(ValueError, match="batch rows"):
        smem(torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="rows"):
        smem.reset_memory(rows=[2])
    with pytest.raises(TypeError, match="neural_memory"):
        StatefulNeuralMemory(torch.nn.Linear(2, 2))
    assert all(torch.equal(v, smem.state_dict()[k]) for k, v in before.items())
