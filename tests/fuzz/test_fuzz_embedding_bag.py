"""Fuzz: weighted_embedding_bag against a brute-force fp64 gather-sum (forward, both gradients), with
NaN and inf placed in the table: non-finite values reach exactly the rows that look them up."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import DTYPES, GRAD_TOL, OUT_TOL, assert_close, backends, device, draw, fuzz_settings, generator, randn, size
from memlayers.ops import weighted_embedding_bag

# NaN and inf placements make the Triton interpreter (numpy) warn about invalid values; expected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.mark.parametrize("backend", backends())
def test_weighted_embedding_bag(backend):
    @fuzz_settings(backend)
    @given(data=st.data())
    def check(data):
        gen = generator(data)
        V, D, T, K = size(data, "V", 1, 50), size(data, "D", 1, 40), size(data, "T", 0, 12), size(data, "K", 0, 6)
        dtype = draw(data, st.sampled_from(DTYPES), "dtype")
        weight, psw = randn(gen, V, D, dtype=dtype), randn(gen, T, K, dtype=dtype)
        indices = torch.randint(0, V, (T, K), generator=gen, dtype=draw(data, st.sampled_from([torch.int64, torch.int32]), "int"))
        poison = draw(data, st.sampled_from([None, float("nan"), float("inf")]), "poison")
        if poison is not None:
            weight[size(data, "row", 0, V - 1), size(data, "col", 0, D - 1)] = poison
        grads = dtype == torch.float32 and poison is None
        weight.requires_grad_(grads), psw.requires_grad_(grads)
        out = weighted_embedding_bag(weight, indices.to(device()), psw, backend=backend)

        w64, p64 = weight.detach().cpu().double().requires_grad_(grads), psw.detach().cpu().double().requires_grad_(grads)
        ref = (p64[..., None] * w64[indices.long()]).sum(1)          # [T, K, D] -> [T, D]
        assert out.shape == (T, D) and out.dtype == dtype
        assert_close(out, ref, OUT_TOL[dtype], "out")                 # NaN/inf pattern exactly as brute force
        if grads:
            g_out = torch.randn(T, D, generator=gen, dtype=torch.float64)
            got = torch.autograd.grad((out.double() * g_out.to(device())).sum(), (weight, psw))
            want = torch.autograd.grad((ref * g_out).sum(), (w64, p64))
            assert_close(got[0], want[0], GRAD_TOL, "grad weight")
            assert_close(got[1], want[1], GRAD_TOL, "grad per_sample_weights")

    check()
