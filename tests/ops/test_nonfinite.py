"""Issue 14, non-finite values: one documented rule per op, followed by every backend.

knn_search: a slot whose score is NaN is no match (never returned; a NaN query row gets only
(-inf, -1)). dkvb_lookup: a NaN distance counts as +inf, a key at +inf is no match, a missing pick
is index -1 with a NaN output row and no gradient. The native backend is checked in
test_knn_search_native.py (it needs the CMake build).
"""
import pytest
import torch

from memlayers import knn_search
from memlayers.ops.dkvb import dkvb_lookup

BACKENDS = ["torch", "triton"]


def brute_force_knn(q, keys, k, metric, bad_slots=()):
    """fp64 scores over every key but ``bad_slots``: (top scores [B, Hq, T, k], count of real matches)."""
    Hq, Hkv = q.shape[1], keys.shape[1]
    kk = keys.double().repeat_interleave(Hq // Hkv, dim=1)
    qq = q.double()
    if metric == "cosine":
        qq, kk = qq / qq.norm(dim=-1, keepdim=True), kk / kk.norm(dim=-1, keepdim=True)
    s = -torch.cdist(qq, kk).pow(2) if metric == "l2" else qq @ kk.transpose(-1, -2)
    s[..., list(bad_slots)] = float("-inf")
    return torch.topk(s.nan_to_num(nan=float("-inf")), k, dim=-1).values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_knn_nan_key_never_ranks_and_nan_query_finds_nothing(backend, metric):
    B, Hq, Hkv, T, M, D, k = 2, 4, 2, 5, 37, 16, 6
    q, keys = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, M, D)
    keys[:, :, 7, 3] = float("nan")   # slot 7 of every (row, kv-head)
    keys[:, :, 20, :] = float("nan")
    q[1, 2, 3, 0] = float("nan")      # one query row
    scores, idx = knn_search(q, keys, k, metric=metric, backend=backend)

    nan_row = torch.zeros(B, Hq, T, dtype=torch.bool)
    nan_row[1, 2, 3] = True
    assert bool((idx[nan_row] == -1).all()) and bool((scores[nan_row] == float("-inf")).all())
    good = ~nan_row
    assert not bool(((idx == 7) | (idx == 20)).any()), "a NaN key was returned"
    assert not bool(scores.isnan().any())
    ref = brute_force_knn(q, keys, k, metric, bad_slots=(7, 20)).float()
    torch.testing.assert_close(scores[good], ref[good], rtol=1e-4, atol=1e-4)
    assert bool((idx[good] >= 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_nan_keys_past_the_valid_ones_leave_missing_results(backend):
    """With fewer non-NaN keys than k, the rest are missing results, not NaN slots."""
    q, keys = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 6, 8)
    keys[0, 0, 1:5] = float("nan")                     # two real keys left: slots 0 and 5
    scores, idx = knn_search(q, keys, 4, backend=backend)
    assert torch.equal(idx[..., 2:], torch.full((1, 1, 3, 2), -1))
    assert bool((scores[..., 2:] == float("-inf")).all())
    assert torch.equal(idx[..., :2].sort(-1).values, torch.tensor([0, 5]).expand(1, 1, 3, 2))


def make_dkvb(B=7, C=3, N=20, Dk=5, Dv=4):
    q, keys = torch.randn(B, C, Dk), torch.randn(C, N, Dk)
    values = torch.randn(C, N, Dv, requires_grad=True)
    return q, keys, values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3])
def test_dkvb_nan_key_is_a_masked_key(backend, k):
    """A key holding NaN is never selected: the lookup equals the one that masks that key out."""
    q, keys, values = make_dkvb()
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 4] = mask[2, 0] = False
    poisoned = keys.clone()
    poisoned[1, 4, 2] = float("nan")
    poisoned[2, 0, :] = float("nan")
    out, idx = dkvb_lookup(q, poisoned, values, k, backend=backend)
    ref, ref_idx = dkvb_lookup(q, keys, values, k, key_mask=mask, backend="torch")
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2])
def test_dkvb_nan_query_gets_index_minus_one_nan_output_and_no_gradient(backend, k):
    q, keys, values = make_dkvb()
    q[2, :, 1] = float("nan")     # input row 2, every codebook
    q[5, 1, 0] = float("nan")     # input row 5, codebook 1
    bad = torch.zeros(7, 3, dtype=torch.bool)
    bad[2, :] = bad[5, 1] = True
    out, idx = dkvb_lookup(q, keys, values, k, backend=backend)
    assert bool((idx[bad] == -1).all()) and bool(out[bad].isnan().all())
    clean = torch.where(bad[..., None], torch.zeros_like(q), q)
    ref, ref_idx = dkvb_lookup(clean, keys, values, k, backend="torch")
    assert torch.equal(idx[~bad], ref_idx[~bad])
    torch.testing.assert_close(out[~bad], ref[~bad])

    grad = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, values, grad)
    (g_ref,) = torch.autograd.grad(ref, values, grad.masked_fill(bad[..., None], 0))
    assert bool(torch.isfinite(g).all())
    torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dkvb_infinite_keys_are_no_match(backend):
    """A key with an infinite entry has +inf (or NaN) distance to every query: no match, like a NaN key."""
    q, keys, values = make_dkvb(B=4, C=1, N=3)
    keys[0, :, 0] = float("inf")   # every key of the only codebook
    out, idx = dkvb_lookup(q, keys, values, 1, backend=backend)
    assert bool((idx == -1).all()) and bool(out.isnan().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_attention_nan_query_is_nan_in_its_own_row_only(backend):
    """A NaN query row gets NaN out and NaN lse (not lse = -inf, which would claim "no memory" and
    let merge_attention drop it silently); every other row is unchanged."""
    from memlayers.ops import memory_attention

    q, mk, mv = torch.randn(1, 2, 4, 8), torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 6)
    idx = torch.randint(0, 10, (1, 2, 4, 3))
    clean_out, clean_lse = memory_attention(q, mk, mv, idx, backend=backend)
    q[0, 1, 2, 5] = float("nan")
    out, lse = memory_attention(q, mk, mv, idx, backend=backend)
    assert bool(out[0, 1, 2].isnan().all()) and bool(lse[0, 1, 2].isnan())
    keep = torch.ones(1, 2, 4, dtype=torch.bool)
    keep[0, 1, 2] = False
    torch.testing.assert_close(out[keep], clean_out[keep])
    torch.testing.assert_close(lse[keep], clean_lse[keep])
