"""The kNN read path over a sharded memory (slot ids are global, winners come back gathered) equals
the read over one unsharded memory, for every position policy. One process, a gloo group of one rank:
the sharded search and the per-query re-indexing of its winners both run."""
import pytest
import torch

from memlayers.layers.knn_read import read_memory
from memlayers.layers.rotary import RotaryCache, apply_rotary
from memlayers.memory import KNNMemory
from memlayers.ops.utils.testing import rel_err


@pytest.mark.parametrize("position", ["rotate", "none", "fixed"])
def test_sharded_read_equals_unsharded(gloo_group, position):
    torch.manual_seed(0)
    B, Hkv, Hq, T, D, C, k = 2, 2, 6, 5, 16, 37, 7
    plain = KNNMemory(B, Hkv, D, capacity=C, backend="torch")
    sharded = KNNMemory(B, Hkv, D, capacity=C, backend="torch", process_group=gloo_group)
    for n in (20, 30):  # the second add wraps the ring
        keys, values = torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
        plain.add(keys, values)
        sharded.add(keys, values)
    rope = RotaryCache(D)
    q = torch.randn(B, Hq, T, D, requires_grad=True)
    pos = torch.arange(60, 60 + T)
    cos, sin = rope.get(60 + T, q.device)
    q_rot = apply_rotary(q, cos[pos], sin[pos])
    kwargs = dict(top_k=k, scale=D ** -0.5, position=position, rope=rope, fixed_distance=9, backend="torch",
                  max_position=60 + T)
    out_ref, lse_ref = read_memory(plain, q, q_rot, **kwargs)
    out, lse = read_memory(sharded, q, q_rot, **kwargs)
    assert rel_err(out, out_ref) < 1e-5 and rel_err(lse, lse_ref) < 1e-5
    (g_ref,) = torch.autograd.grad(out_ref.square().sum(), q, retain_graph=True)
    (g,) = torch.autograd.grad(out.square().sum(), q)
    assert rel_err(g, g_ref) < 1e-5
