"""Shared helpers of the KNNMemory tests."""
import pytest
import torch


def _stream(mem, steps, T, start=0):
    """Add ``steps`` chunks of T tokens whose value[..., 0] is the token's global id and whose keys are
    random; returns the keys ``[B, H, steps * T, D]``."""
    B, H, D, Dv = mem.batch_size, mem.heads, mem.dim, mem.value_dim
    all_keys = []
    for step in range(steps):
        keys = torch.randn(B, H, T, D)
        values = torch.randn(B, H, T, Dv)
        values[..., 0] = torch.arange(start + step * T, start + (step + 1) * T, dtype=torch.float32)
        mem.add(keys, values)
        all_keys.append(keys)
    return torch.cat(all_keys, dim=2)


@pytest.fixture
def stream():
    return _stream
