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
