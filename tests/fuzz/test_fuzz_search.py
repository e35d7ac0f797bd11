"""Fuzz: knn_search and dkvb_lookup against brute-force fp64 search, NaN placement included."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fuzz_helpers import DTYPES, OUT_TOL, assert_close, backends, device, draw, fuzz_settings, generator, randn, size
from memlayers.ops import dkvb_lookup, knn_search

# NaN placements make the Triton interpreter (numpy) warn about invalid values; they are expected.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")


def max_sq_norm(x):
    """Largest squared row norm, NaN entries left out: the size of the scores' rounding errors."""
    x = x.double().nan_to_num(nan=0.0)
    return x.pow(2).sum(-1).max().item() if x.numel() else 0.0


def knn_brute_force(q, keys, metric, lengths):
    """fp64 scores [B, Hq, T, M] with -inf for slots past the valid length or scoring NaN."""
    B, Hq, T, D = q.shape
    Hkv, M = keys.shape[1], keys.shape[2]
    qq = q.double().cpu()
    kk = keys.double().cpu().repeat_interleave(Hq // Hkv, dim=1)
    if metric == "cosine":
        qq = qq / qq.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kk = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = qq @ kk.transpose(-1, -2)
    if metric == "l2":
        s = 2 * s - qq.pow(2).sum(-1, keepdim=True) - kk.pow(2).sum(-1)[:, :, None, :]
    lengths = lengths.cpu().repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq]
    past = torch.arange(M)[None, None, :] >= lengths[..., None]
    return s.masked_fill(past[:, :, None, :], float("-inf")).nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


@pytest.mark.parametrize("backend", backends())
def test_knn_search(backend):
    @fuzz_settings(backend)
    @given(data=st.data())
    def check(data):
        gen = generator(data)
        B, Hkv, group = size(data, "B", 0, 2), size(data, "Hkv", 1, 2), size(data, "group", 1, 2)
        T, M, D = size(data, "T", 0, 5), size(data, "M", 0, 40), size(data, "D", 1, 33)
        k = size(data, "k", 0, 9)
        metric = draw(data, st.sampled_from(["ip", "cosine", "l2"]), "metric")
        dtype = draw(data, st.sampled_from(DTYPES), "dtype")
        q, keys = randn(gen, B, Hkv * group, T, D, dtype=dtype), randn(gen, B, Hkv, M, D, dtype=dtype)
        lengths = torch.randint(0, M + 1, (B, Hkv), generator=gen) if draw(data, st.booleans(), "lengths") else None
        if M and B and draw(data, st.booleans(), "NaN key"):
            keys[size(data, "b", 0, B - 1), size(data, "h", 0, Hkv - 1), size(data, "slot", 0, M - 1), 0] = float("nan")
        if T and B and draw(data, st.booleans(), "NaN query"):
            q[size(data, "qb", 0, B - 1), size(data, "qh", 0, Hkv * group - 1), size(data, "t", 0, T - 1), -1] = float("nan")
        valid = lengths.to(device()) if lengths is not None else None

        scores, idx = knn_search(q, keys, k, valid_lengths=valid, metric=metric, backend=backend)
        assert scores.shape == idx.shape == (B, Hkv * group, T, k)
        assert scores.dtype == torch.float32 and idx.dtype == torch.int64
        full = knn_brute_force(q, keys, metric, lengths if lengths is not None else torch.full((B, Hkv), M))
        ref = torch.topk(full, min(k, M), dim=-1).values if M else full[..., :0]
        ref = torch.cat([ref, ref.new_full((*ref.shape[:-1], k - ref.shape[-1]), float("-inf"))], -1)
        scores, idx = scores.cpu(), idx.cpu()

        missing = ref == float("-inf")
        assert torch.equal(idx == -1, missing), "missing results differ from brute force (a NaN or padding slot returned?)"
        assert bool((scores[missing] == float("-inf")).all()) and not bool(scores.isnan().any())
        # Scores: the brute-force top-k values, best first; each index scores what it claims.
        scale = 1.0 + max_sq_norm(q) + max_sq_norm(keys)
        atol = 1e-5 * scale
        assert torch.allclose(scores[~missing].double(), ref[~missing], rtol=0, atol=atol)
        if M:
            claimed = full.gather(-1, idx.clamp_min(0))
            assert torch.allclose(claimed[~missing], scores[~missing].double(), rtol=0, atol=atol)
        found = idx.masked_fill(missing, -1).sort(-1).values
        assert not bool(((found[..., 1:] == found[..., :-1]) & (found[..., 1:] >= 0)).any()), "a slot returned twice"

    check()


def dkvb_brute_force(q, keys, key_mask):
    """fp64 distances [B, C, N] (||k||^2 - 2 q.k), NaN and masked keys at +inf."""
    qq, kk = q.double().cpu(), keys.double().cpu()
    d = kk.pow(2).sum(-1)[None] - 2 * torch.einsum("bcd,cnd->bcn", qq, kk)
    d = d.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    return d if key_mask is None else d.masked_fill(~key_mask.cpu()[None], float("inf"))


@pytest.mark.parametrize("backend", backends())
def test_dkvb_lookup(backend):
    @fuzz_settings(backend)
    @given(data=st.data())
    def check(data):
        gen = generator(data)
        B, C, N = size(data, "B", 0, 9), size(data, "C", 0, 3), size(data, "N", 1, 40)
        Dk, Dv, k = size(data, "Dk", 1, 17), size(data, "Dv", 1, 9), size(data, "k", 1, 4)
        k = min(k, N)
        dtype = draw(data, st.sampled_from(DTYPES), "dtype")
        q, keys = randn(gen, B, C, Dk, dtype=dtype), randn(gen, C, N, Dk, dtype=dtype)
        values = randn(gen, C, N, Dv, dtype=draw(data, st.sampled_from(DTYPES), "value dtype")).requires_grad_()
        key_mask = None
        if draw(data, st.booleans(), "key_mask"):
            key_mask = torch.rand(C, N, generator=gen) < 0.6
            key_mask[:, :k] = True  # at least k keys per codebook
            key_mask = key_mask.to(device())
        if C and draw(data, st.booleans(), "NaN key"):
            keys[size(data, "c", 0, C - 1), size(data, "n", 0, N - 1), 0] = float("nan")
        if B and C and draw(data, st.booleans(), "NaN query"):
            q[size(data, "b", 0, B - 1), size(data, "qc", 0, C - 1), -1] = float("nan")

        out, idx = dkvb_lookup(q, keys, values, k, key_mask=key_mask, backend=backend)
        assert out.shape == (B, C, Dv) and idx.shape == (B, C, k) and out.dtype == values.dtype
        d = dkvb_brute_force(q, keys, key_mask)
        ref_d = torch.topk(d, k, dim=-1, largest=False).values if B * C else d[..., :k]
        idx_c = idx.cpu()
        no_match = ref_d == float("inf")
        assert torch.equal(idx_c == -1, no_match), "picks without a match must be -1, and only those"
        got_d = d.gather(-1, idx_c.clamp_min(0)).masked_fill(no_match, float("inf"))
        scale = 1.0 + max_sq_norm(q) + max_sq_norm(keys)
        assert torch.allclose(got_d, ref_d, rtol=0, atol=1e-5 * scale, equal_nan=True), "not the nearest keys"

        found = ~no_match.any(-1)  # [B, C]
        fetched = values.double().cpu()[torch.arange(C)[None, :, None], idx_c.clamp_min(0)]  # [B, C, k, Dv]
        ref_out = torch.where(found[..., None], fetched.mean(2), float("nan"))
        assert_close(out, ref_out, OUT_TOL[values.dtype], "out")

        grad = torch.randn(B, C, Dv, generator=gen).to(device=device(), dtype=values.dtype)
        (g,) = torch.autograd.grad(out, values, grad)
        g_ref = torch.zeros(C, N, Dv, dtype=torch.float64)
        contrib = (grad.double().cpu() * found[..., None])[:, :, None, :].expand(B, C, k, Dv) / k
        g_ref.index_put_((torch.arange(C)[None, :, None].expand(B, C, k), idx_c.clamp_min(0)), contrib, accumulate=True)
        assert_close(g, g_ref, OUT_TOL[values.dtype], "grad values")

    check()
