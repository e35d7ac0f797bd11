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
