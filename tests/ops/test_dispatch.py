"""Backend dispatch: Triton for CUDA (or the interpreter), torch otherwise; forced by argument or env."""
import pytest
import torch

from memlayers.ops.utils import resolve_backend


def test_forced_backends(monkeypatch):
    monkeypatch.delenv("MEMLAYERS_BACKEND", raising=False)
    x = torch.zeros(1)
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", x) == "triton"


def test_auto_on_cpu_follows_the_interpreter(monkeypatch):
    monkeypatch.delenv("MEMLAYERS_BACKEND", raising=False)
    x = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve_backend("auto", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", x) == "triton"


def test_environment_forces_auto(monkeypatch):
    x = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MEMLAYERS_BACKEND", "torch")
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("triton", x) == "triton"  # an explicit argument wins
    monkeypatch.setenv("MEMLAYERS_BACKEND", "cuda")
    with pytest.raises(ValueError, match="MEMLAYERS_BACKEND"):
        resolve_backend("auto", x)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors"):
        resolve_backend("triton", torch.zeros(1))
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("gpu", torch.zeros(1))


def test_native_goes_through_the_dispatcher_for_ops_that_have_it(monkeypatch):
    monkeypatch.setenv("MEMLAYERS_BACKEND", "triton")  # an explicit backend wins over the environment
    x = torch.zeros(1)
    assert resolve_backend("native", x, op="knn_search") == "native"
    with pytest.raises(ValueError, match="backend='native' exists for knn_search only, not for dkvb_lookup"):
        resolve_backend("native", x, op="dkvb_lookup")
    with pytest.raises(ValueError, match="backend='native' exists for knn_search only"):
        resolve_backend("native", x)


def test_ops_without_a_native_backend_say_so():
    from memlayers.ops import dkvb_lookup, local_attention

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="not for local_attention"):
        local_attention(q, q, q, backend="native")
    with pytest.raises(ValueError, match="not for dkvb_lookup"):
        dkvb_lookup(torch.randn(2, 1, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 3), backend="native")


def test_native_search_runs_through_resolve_backend(monkeypatch):
    """knn_search(backend="native") asks the dispatcher (which checks the op and the device) first."""
    import importlib

    ks = importlib.import_module("memlayers.ops.knn_search")  # the module, not the function of that name

    calls = []
    real = ks.resolve_backend

    def spy(backend, *tensors, op=None):
        calls.append((backend, op))
        return real(backend, *tensors, op=op)

    monkeypatch.setattr(ks, "resolve_backend", spy)
    monkeypatch.setattr(ks, "knn_search_native_lib", lambda *a: "native result")
    assert ks.knn_search(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 5, 8), 3, backend="native") == "native result"
    assert calls == [("native", "knn_search")]
