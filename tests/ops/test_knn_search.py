"""knn_search: the Triton kernel against the naive reference (and the reference against brute force)."""
import pytest
import torch

from memlayers import knn_search
from memlayers.ops.knn_search.naive import knn_search_naive
from memlayers.ops.knn_search.triton import MAX_KERNEL_K, knn_search_fwd
from memlayers.ops.utils.testing import poison_, rel_err


def true_scores(q, keys, metric):
    """fp64 brute-force scores [B, Hq, T, M]."""
    B, Hq, T, D = q.shape
    Hkv = keys.shape[1]
    kk = keys.double().repeat_interleave(Hq // Hkv, dim=1)
    qq = q.double()
    if metric == "ip":
        return qq @ kk.transpose(-1, -2)
    if metric == "cosine":
        qn = qq / qq.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        kn = kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return qn @ kn.transpose(-1, -2)
    return -torch.cdist(qq, kk).pow(2)


def check_topk(scores, idx, q, keys, k, metric, lengths=None, tol=1e-5):
    """Returned scores equal the true top-k scores; each returned index is a true top-k member up to ties."""
    B, Hq, T, _ = q.shape
    M = keys.shape[2]
    full = true_scores(q, keys, metric)
    if lengths is not None:
        invalid = torch.arange(M)[None, :] >= lengths[:, None].cpu()
        full = full.masked_fill(invalid[:, None, None, :], float("-inf"))
    kk = min(k, M)
    ref = torch.topk(full, kk, dim=-1).values
    n_valid = (full > float("-inf")).sum(-1)  # [B, Hq, T]
    scores, idx = scores.cpu(), idx.cpu()
    got = scores[..., :kk]
    valid = ref > float("-inf")
    assert torch.equal(got > float("-inf"), valid), "validity of results differs from the true top-k"
    assert rel_err(got[valid], ref[valid]) <= tol, f"scores rel err {rel_err(got[valid], ref[valid])}"
    # Missing results marked (-1, -inf), never a slot past the valid length.
    assert bool((idx[~(scores > float('-inf'))] == -1).all())
    assert bool((scores[..., kk:] == float("-inf")).all()) and bool((idx[..., kk:] == -1).all())
    assert int((idx >= 0).sum(-1).sub(n_valid.clamp(max=k)).abs().max()) == 0
    # Recall@k = 1 up to ties: each returned slot's true score reaches the true k-th best.
    kth = ref[..., -1:].clamp_min(-1e30)
    picked = full.gather(-1, idx.clamp_min(0)).masked_fill(idx < 0, float("inf"))
    assert bool((picked >= kth - tol * kth.abs().clamp_min(1) * 10).all()), "returned a slot outside the top-k"
    # Sorted best first.
    assert bool((scores[..., 1:] <= scores[..., :-1]).all())


CASES = [
    # B, Hq, Hkv, T, M, D, k
    (1, 1, 1, 1, 1, 16, 1),
    (2, 4, 2, 3, 63, 16, 5),
    (1, 2, 1, 7, 100, 64, 33),
    (1, 3, 3, 5, 1000, 80, 7),
    (1, 2, 1, 2, 300, 128, 100),
    (1, 1, 1, 4, 20, 32, 50),  # k > M
]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_naive_is_exact(shape, metric):
    B, Hq, Hkv, T, M, D, k = shape
    q, keys = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, M, D)
    s, i = knn_search(q, keys, k, metric=metric, backend="torch")
    check_topk(s, i, q, keys, k, metric)


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_triton_matches_reference(shape, metric, device):
    B, Hq, Hkv, T, M, D, k = shape
    q, keys = torch.randn(B, Hq, T, D, device=device), torch.randn(B, Hkv, M, D, device=device)
    s, i = knn_search(q, keys, k, metric=metric, backend="triton")
    check_topk(s, i, q, keys, k, metric)
    s_ref, _ = knn_search_naive(q, keys, k, metric=metric)
    assert rel_err(s[s > float("-inf")], s_ref[s_ref > float("-inf")]) <= 1e-5


def test_kernel_takes_k_up_to_its_maximum(device):
    """The kernel's register buffer is bounded: it serves k <= MAX_KERNEL_K and refuses more (the
    Triton backend runs larger k on the torch path, test_k_beyond_faiss_gpu_cap)."""
    q = torch.randn(1, 2, 3, 16, device=device)
    keys = torch.randn(1, 1, 300, 16, device=device)
    s, i = knn_search(q, keys, MAX_KERNEL_K, backend="triton")
    check_topk(s, i, q, keys, MAX_KERNEL_K, "ip")
    lengths = torch.full((1, 1), 300, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="k must be at most"):
        knn_search_fwd(q.reshape(1, 1, 6, 16), keys, MAX_KERNEL_K + 1, lengths, "ip")


def test_k_beyond_faiss_gpu_cap(device):
    """k is not capped at 2048 (faiss-GPU's limit) nor rounded to a power of two."""
    q = torch.randn(1, 1, 2, 16, device=device)
    keys = torch.randn(1, 1, 2200, 16, device=device)
    s, i = knn_search(q, keys, 2100, backend="triton")
    check_topk(s, i, q, keys, 2100, "ip")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype, device):
    q = torch.randn(1, 4, 9, 64, device=device, dtype=dtype)
    keys = torch.randn(1, 2, 200, 64, device=device, dtype=dtype)
    s, i = knn_search(q, keys, 12, backend="triton")
    # Scores accumulate in fp32 from the low-precision inputs: compare with fp64 on the same inputs.
    check_topk(s, i, q, keys, 12, "ip", tol=1e-5)
    assert s.dtype == torch.float32 and i.dtype == torch.int64


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_valid_lengths_are_honored(backend, device):
    q = torch.randn(3, 2, 4, 16, device=device)
    keys = torch.randn(3, 2, 90, 16, device=device)
    lengths = torch.tensor([90, 17, 0], device=device)
    s, i = knn_search(q, keys, 20, valid_lengths=lengths, backend=backend)
    check_topk(s, i, q, keys, 20, "ip", lengths=lengths)
    assert int(i[1].max()) < 17 and bool((i[2] == -1).all()) and bool((s[2] == float("-inf")).all())
    # Per-(row, head) lengths.
    per_head = torch.tensor([[5, 90], [17, 1], [0, 3]], device=device)
    s, i = knn_search(q, keys, 6, valid_lengths=per_head, backend=backend)
    for b in range(3):
        for h in range(2):
            assert int(i[b, h].max()) < int(per_head[b, h]) or int(per_head[b, h]) == 0
            assert int((i[b, h] >= 0).sum(-1).min()) == min(6, int(per_head[b, h]))


def test_split_merge_equals_single_pass(device):
    """Splitting the keys over programs (decode-time parallelism) gives the same result."""
    q = torch.randn(1, 2, 3, 32, device=device)
    keys = torch.randn(1, 2, 500, 32, device=device)
    from memlayers.ops.knn_search.triton import knn_search_triton

    s1, i1 = knn_search_triton(q, keys, 9, splits=1)
    s4, i4 = knn_search_triton(q, keys, 9, splits=4)
    assert torch.equal(s1, s4) and torch.equal(i1, i4)
    check_topk(s4, i4, q, keys, 9, "ip")


def test_kernel_writes_every_output_element(device):
    q = torch.randn(1, 1, 37, 16, device=device)
    keys = torch.randn(1, 1, 150, 16, device=device)
    lengths = torch.tensor([[150]], device=device)
    out = (poison_(torch.empty(1, 1, 37, 3, 11, device=device)),
           poison_(torch.empty(1, 1, 37, 3, 11, device=device, dtype=torch.int64)))
    s, i = knn_search_fwd(q, keys, 11, lengths, "ip", splits=3, out=out)
    assert not bool(torch.isnan(s).any())
    assert bool((i >= 0).all()) and bool((i < 150).all())


def test_ties_keep_scores_exact(device):
    """Duplicate keys: the indices may reorder among ties, the scores may not."""
    base = torch.randn(1, 1, 10, 16, device=device)
    keys = base.repeat(1, 1, 8, 1)  # every key 8 times
    q = torch.randn(1, 1, 5, 16, device=device)
    s, i = knn_search(q, keys, 12, backend="triton")
    s_ref, _ = knn_search(q, keys, 12, backend="torch")
    assert rel_err(s, s_ref) <= 1e-6
    assert len(set(i[0, 0, 0].tolist())) == 12  # no slot returned twice


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(queries=torch.randn(2, 4, 16), keys=torch.randn(2, 2, 8, 16), k=3), ValueError, "queries"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 3, 8, 16), k=3), ValueError, "multiple"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 2, 8, 8), k=3), ValueError, "keys"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(1, 2, 8, 16), k=3), ValueError, "keys"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 2, 8, 16).double(), k=3), TypeError, "keys"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 2, 8, 16), k=-1), ValueError, "k must be >= 0"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 2, 8, 16), k=2.5), TypeError, "k"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 2, 8, 16), k=2, metric="dot"), ValueError, "metric"),
        (dict(queries=torch.randn(2, 4, 3, 16), keys=torch.randn(2, 2, 8, 16), k=2,
              valid_lengths=torch.tensor([1, 2, 3])), ValueError, "valid_lengths"),
        (dict(queries=torch.randn(1, 1, 3, 300), keys=torch.randn(1, 1, 8, 300), k=2), ValueError, "256"),
        (dict(queries=torch.randn(1, 1, 3, 16), keys=torch.randn(1, 1, 8, 16), k=2, backend="cuda"), ValueError, "backend"),
    ],
)
def test_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        knn_search(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, M, D, k", [(1, 65536, 128, 32), (512, 65536, 64, 256), (64, 20000, 128, 3000), (300, 4097, 256, 17)])
def test_triton_large_gpu(T, M, D, k, dtype):
    q = torch.randn(2, 8, T, D, device="cuda", dtype=dtype)
    keys = torch.randn(2, 2, M, D, device="cuda", dtype=dtype)
    lengths = torch.tensor([M, M // 3], device="cuda")
    s, i = knn_search(q, keys, k, valid_lengths=lengths, backend="triton")
    s_ref, _ = knn_search(q, keys, k, valid_lengths=lengths, backend="torch")
    assert rel_err(s[s > float("-inf")], s_ref[s_ref > float("-inf")]) <= 1e-5
    assert int(i[1].max()) < M // 3
