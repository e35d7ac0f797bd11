"""The decode-path ops read no tensor data on the host (issue 13): on a GPU every such read waits for
the device, once per layer and decode step. A read is any Python-level access to tensor data
(``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ...), counted by patching ``torch.Tensor``."""
import pytest
import torch

from memlayers.ops.knn_search import knn_search
from memlayers.ops.local_attention import local_attention
from memlayers.ops.memory_attention import memory_attention, merge_attention


def _decode_step(device, rotary):
    """One decode step's memory read: 1 query token, 2 query heads over 1 kv-head, 8 of 50 slots."""
    B, Hq, Hkv, C, D, k = 2, 2, 1, 50, 16, 8
    q = torch.randn(B, Hq, 1, D, device=device)
    keys, values = torch.randn(B, Hkv, C, D, device=device), torch.randn(B, Hkv, C, D, device=device)
    lengths = torch.tensor([C, 30], device=device)
    kw = {}
    if rotary:
        P = 64
        kw = dict(mem_positions=torch.randint(0, P, (B, C), device=device),
                  rotary_cos=torch.randn(P, D, device=device), rotary_sin=torch.randn(P, D, device=device))
    return q, keys, values, lengths, k, kw


# The torch backend on CPU; the Triton backend wherever it runs here (CUDA, or the CPU interpreter,
# whose own numpy conversions happen inside the kernel launch, not through torch.Tensor methods).
BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rotary", [False, True])
def test_memory_read_step_reads_nothing_without_validate(device, host_reads, backend, rotary):
    q, keys, values, lengths, k, kw = _decode_step(device, rotary)
    host_reads.clear()
    _, idx = knn_search(q, keys, k, valid_lengths=lengths, backend=backend)
    out_m, lse_m = memory_attention(q, keys, values, idx, backend=backend, validate=False, **kw)
    kv = torch.randn(2, 1, 5, 16, device=device)
    out_l, lse_l = local_attention(q, kv, kv, backend=backend)
    merge_attention(out_l, lse_l, out_m, lse_m)
    assert host_reads == []


def test_validate_is_the_one_read(device, host_reads):
    q, keys, values, lengths, k, kw = _decode_step(device, rotary=True)
    idx = torch.randint(-1, keys.shape[2], (2, 2, 1, k), device=device)
    host_reads.clear()
    memory_attention(q, keys, values, idx, backend="torch", **kw)
    assert host_reads == ["tolist"]  # both checks (indices and positions) in one read


def test_validate_false_equals_validated_call(device):
    q, keys, values, _, k, kw = _decode_step(device, rotary=True)
    idx = torch.randint(-1, keys.shape[2], (2, 2, 1, k), device=device)
    checked = memory_attention(q, keys, values, idx, **kw)
    unchecked = memory_attention(q, keys, values, idx, validate=False, **kw)
    for a, b in zip(checked, unchecked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_validate_must_be_a_bool(device):
    q, keys, values, _, k, _ = _decode_step(device, rotary=False)
    idx = torch.zeros(2, 2, 1, k, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="validate"):
        memory_attention(q, keys, values, idx, validate=1)
