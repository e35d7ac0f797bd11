"""The HuggingFace wrapper's local attention of one decode query (no mask): the causal reference's
output, log-sum-exp and gradients, without its mask."""
import pytest
import torch

from memlayers.hf.attention import local_attention
from memlayers.ops.local_attention import local_attention as causal_local_attention


@pytest.mark.parametrize("Hq,Hkv,S,D", [(9, 3, 517, 64), (4, 4, 1, 8), (6, 2, 33, 5)])
def test_one_query_matches_the_causal_reference(Hq, Hkv, S, D):
    torch.manual_seed(S)
    q = torch.randn(2, Hq, 1, D, requires_grad=True)
    k = torch.randn(2, Hkv, S, D, requires_grad=True)
    v = torch.randn(2, Hkv, S, D + 1, requires_grad=True)
    got = local_attention(q, k, v, None, 0.3, backend="torch")
    ref = causal_local_attention(q, k, v, scale=0.3, backend="torch")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.float())
    loss = lambda out, lse: out.square().sum() + lse.sum()
    for a, b in zip(torch.autograd.grad(loss(*got), (q, k, v)), torch.autograd.grad(loss(*ref), (q, k, v))):
        torch.testing.assert_close(a, b)


def test_nan_query_stays_in_its_row():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8)
    q[0, 0, 0, 0] = float("nan")
    out, lse = local_attention(q, k, v, None, 0.5, backend="torch")
    assert bool(out[0, 0].isnan().all()) and bool(lse[0, 0].isnan())
    assert bool(out[0, 1].isfinite().all()) and bool(lse[0, 1].isfinite())
