"""titans_memory rejects bad input with errors naming the argument, before any work."""
import pytest
import torch

from memlayers.ops.titans import titans_memory


def args(B=1, H=2, T=10, D=8):
    return dict(
        q=torch.randn(B, H, T, D), k=torch.randn(B, H, T, D), v=torch.randn(B, H, T, D),
        theta=torch.rand(B, H, T), weights=(torch.zeros(B, H, D, D),),
        alpha=torch.rand(B, H, T), eta=torch.rand(B, H, T),
    )


def call(**over):
    a = args()
    a["backend"] = "torch"
    a.update(over)
    return titans_memory(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("theta"), a.pop("weights"), **a)


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.randn(2, 10, 8)), ValueError, "q"),
    (dict(k=torch.randn(1, 2, 9, 8)), ValueError, "k"),
    (dict(v=torch.randn(1, 2, 10, 8, dtype=torch.float64)), TypeError, "v"),
    (dict(q=torch.randint(0, 3, (1, 2, 10, 8))), TypeError, "q"),
    (dict(theta=torch.rand(1, 2, 11)), ValueError, "theta"),
    (dict(alpha=torch.rand(1, 2)), ValueError, "alpha"),
    (dict(eta=[0.9] * 10), TypeError, "eta"),
    (dict(weights=torch.zeros(1, 2, 8, 8)), TypeError, "weights"),
    (dict(weights=(torch.zeros(1, 2, 8, 7),)), ValueError, r"weights\[0\]"),
    (dict(weights=(torch.zeros(1, 2, 8, 4), torch.zeros(1, 2, 5, 8))), ValueError, r"weights\[1\]"),
    (dict(momentum=(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))), ValueError, "momentum"),
    (dict(eta=None, momentum=(torch.zeros(1, 2, 8, 8),)), ValueError, "momentum"),
    (dict(v=torch.randn(1, 2, 10, 6), weights=(torch.zeros(1, 2, 8, 6), torch.zeros(1, 2, 6, 6))), ValueError, "residual"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=16.0), TypeError, "chunk_size"),
    (dict(bias="l1"), ValueError, "bias"),
    (dict(p=0.5), ValueError, "p"),
    (dict(delta=float("nan")), ValueError, "delta"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


@pytest.mark.parametrize("name", ["q", "k", "v", "theta", "alpha", "eta"])
def test_non_finite_rejected(name):
    a = args()
    a[name][0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=f"{name} contains non-finite"):
        call(**{name: a[name]})


def test_non_finite_state_rejected():
    w = torch.zeros(1, 2, 8, 8)
    w[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"weights\[0\] contains non-finite"):
        call(weights=(w,))


def test_triton_backend_refuses_unsupported_shapes():
    pytest.importorskip("triton")
    a = args(T=20)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_memory(a["q"], a["k"], a["v"], a["theta"], a["weights"], chunk_size=12, backend="triton")


@pytest.mark.parametrize("name,value", [
    ("alpha", 1.5), ("alpha", -0.1), ("eta", 1.0 + 1e-3), ("eta", -1e-6), ("theta", -0.01),
])
def test_gate_out_of_range_rejected(name, value):
    a = args()
    a[name][0, 1, 4] = value
    with pytest.raises(ValueError, match=f"{name} must lie in"):
        call(**{name: a[name]})


@pytest.mark.parametrize("name,value", [("alpha", 0.0), ("alpha", 1.0), ("eta", 0.0), ("eta", 1.0), ("theta", 0.0)])
def test_gate_range_ends_accepted(name, value):
    a = args()
    a[name].fill_(value)
    y, _, _ = call(**{name: a[name]})
    assert torch.isfinite(y).all()


def test_validate_false_skips_value_checks_but_not_shapes():
    a = args()
    a["alpha"][0, 0, 0] = 1.5
    y, _, _ = call(alpha=a["alpha"], validate=False)  # the caller vouches for the values
    assert y.shape == (1, 2, 10, 8)
    with pytest.raises(ValueError, match="theta"):
        call(theta=torch.rand(1, 2, 11), validate=False)
    with pytest.raises(TypeError, match="validate"):
        call(validate=1)


def test_values_are_read_back_once(monkeypatch):
    # All finiteness and range checks share one device-to-host read (one sync per call on a GPU).
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real_tolist(self))
    call()
    assert len(reads) == 1


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_length_sequence_gives_empty_outputs_and_gradients(depth, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    a = args(T=0)
    if depth == 2:
        a["weights"] = (torch.randn(1, 2, 8, 12), torch.randn(1, 2, 12, 8))
    a["momentum"] = tuple(torch.randn_like(w) for w in a["weights"])
    leaves = [a[n].requires_grad_(True) for n in ("q", "k", "v", "theta", "alpha", "eta")]
    leaves += [t.requires_grad_(True) for t in a["weights"] + a["momentum"]]
    y, w, s = titans_memory(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("theta"), a.pop("weights"), backend=backend, **a)
    assert y.shape == (1, 2, 0, 8)
    for got, init in zip(w + s, leaves[6:]):
        assert torch.equal(got, init) and got.data_ptr() != init.data_ptr()  # unchanged, not aliased
    loss = sum((t * torch.randn_like(t)).sum() for t in (y, *w, *s))
    grads = torch.autograd.grad(loss, leaves)
    for g, t in zip(grads, leaves):
        assert g.shape == t.shape
    assert all(g.abs().sum() > 0 for g in grads[6:])  # the states' gradients pass straight through


def test_triton_backend_refuses_wide_mlp_heads_with_large_chunks():
    # Head dim 256 MLP: a 64-token chunk's backward would not fit in shared memory; 32 does.
    pytest.importorskip("triton")
    a = args(T=4, D=256)
    w = (torch.zeros(1, 2, 256, 256), torch.zeros(1, 2, 256, 256))
    with pytest.raises(ValueError, match="chunk_size <= 32"):
        titans_memory(a["q"], a["k"], a["v"], a["theta"], w, chunk_size=64, backend="triton")
    from memlayers.ops.titans import kernel_supports

    assert kernel_supports(w, a["q"], a["v"], 32) is None
    assert kernel_supports(w[:1], a["q"], a["v"], 64) is None  # the linear memory is split by value blocks
