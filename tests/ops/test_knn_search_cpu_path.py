"""The naive path's CPU machinery: key layouts, per-row GEMVs, chunking and two-stage selection."""
import pytest
import torch

from memlayers import knn_search
from memlayers.ops.knn_search import naive
from memlayers.ops.knn_search.naive import _select_topk, knn_search_naive

from test_knn_search import check_topk


def dim_major(keys: torch.Tensor) -> torch.Tensor:
    """The same [B, H, M, D] keys stored as KNNMemory stores them on CPU."""
    return keys.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])  # query rows per kv-head: decode (1-4) and past it
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_layouts_agree(rows, metric):
    torch.manual_seed(rows)
    B, Hkv, M, D, k = 2, 2, 517, 24, 9
    q, keys = torch.randn(B, Hkv * rows, 1, D), torch.randn(B, Hkv, M, D)  # grouped: rows = group size
    lengths = torch.tensor([M, 301])
    s, i = knn_search(q, keys, k, valid_lengths=lengths, metric=metric, backend="torch")
    s_dm, i_dm = knn_search(q, dim_major(keys), k, valid_lengths=lengths, metric=metric, backend="torch")
    check_topk(s_dm, i_dm, q, keys, k, metric, lengths)
    torch.testing.assert_close(s_dm, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 7, 23])
@pytest.mark.parametrize("chunk", [1, 3, 5])  # one GEMV, per-row GEMVs, one GEMM per chunk
def test_chunks_and_partial_last_chunk(monkeypatch, T, chunk):
    # A budget of `chunk` rows per (row, kv-head) pair forces several chunks and a partial last one.
    pairs, M = 4, 100
    monkeypatch.setattr(naive, "SCORE_BUDGET", chunk * pairs * M)
    monkeypatch.setattr(naive, "MIN_CHUNK_ROWS", 1)
    assert naive._chunk_rows(2 * T, pairs, M) == min(chunk, 2 * T)
    q, keys = torch.randn(2, 4, T, 16), torch.randn(2, 2, M, 16)
    full = (q.double() @ keys.double().repeat_interleave(2, 1).transpose(-1, -2))
    full[0, 2:, :, 40:] = float("-inf")
    full[1, :2, :, 7:] = float("-inf")
    full[1, 2:] = float("-inf")
    ref = torch.topk(full, 6, dim=-1).values.float()
    for layout in (keys, dim_major(keys)):
        s, i = knn_search_naive(q, layout, 6, valid_lengths=torch.tensor([[M, 40], [7, 0]]))
        torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)
        assert bool((i[1, 2:] == -1).all()) and bool((i[1, :2, :, :] < 7).all())


# M: whole groups only, and a remainder past the last group (odd sizes).
@pytest.mark.parametrize("k,M", [(1, 64), (3, 1000), (16, 4096), (16, 333), (32, 16387)])
def test_two_stage_selection_is_exact(monkeypatch, k, M):
    monkeypatch.setattr(naive, "GROUPED_SELECT_MIN_SCORES", 0)  # two stages at every size here
    torch.manual_seed(k)
    for s in (torch.randn(3, 5, M), torch.randint(-4, 5, (3, 5, M)).float()):  # random, then heavy ties
        s[0, 0, 7] = float("-inf")
        v, i = _select_topk(s, k)
        ref = torch.topk(s, k, dim=-1).values
        assert torch.equal(v, ref)
        assert torch.equal(s.gather(-1, i), v), "indices must point at the returned scores"
        assert bool((i[..., :, None] != i[..., None, :]).sum(-1).eq(k - 1).all()), "indices must be distinct"


def test_two_stage_selection_runs_inside_knn_search(monkeypatch):
    k, M = 2, 8 * 2 * naive.GROUPED_SELECT_MIN_GROUP ** 2
    monkeypatch.setattr(naive, "GROUPED_SELECT_MIN_SCORES", 0)
    q, keys = torch.randn(1, 2, 3, 8), torch.randn(1, 1, M, 8)
    called = []
    amax = torch.Tensor.amax
    monkeypatch.setattr(torch.Tensor, "amax", lambda self, *a, **kw: called.append(1) or amax(self, *a, **kw))
    s, i = knn_search(q, keys, k, backend="torch")
    assert called, "the group-maximum stage did not run"
    check_topk(s, i, q, keys, k, "ip")


def test_small_score_blocks_skip_the_two_stages(monkeypatch):
    # Decode at 1K slots: one topk beats the two stages' dozen ops.
    called = []
    amax = torch.Tensor.amax
    monkeypatch.setattr(torch.Tensor, "amax", lambda self, *a, **kw: called.append(1) or amax(self, *a, **kw))
    q, keys = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 1024, 64)
    s, i = knn_search(q, keys, 32, backend="torch")
    assert not called
    check_topk(s, i, q, keys, 32, "ip")


def test_search_is_not_differentiable():
    q = torch.randn(1, 1, 2, 8, requires_grad=True)
    s, _ = knn_search(q, torch.randn(1, 1, 30, 8), 4, backend="torch")
    assert not s.requires_grad


def test_kept_score_block_leaves_earlier_results_alone(monkeypatch):
    # Decode-sized blocks reuse one buffer across calls; what a call returned must not change after
    # the next call, chunked or not, and a block above the kept size is allocated fresh.
    torch.manual_seed(5)
    q1, q2 = torch.randn(1, 6, 1, 16), torch.randn(1, 6, 1, 16)
    keys = dim_major(torch.randn(1, 3, 301, 16))
    s1, i1 = knn_search_naive(q1, keys, 7)
    expected = (s1.clone(), i1.clone())
    knn_search_naive(q2, keys, 7)
    torch.testing.assert_close((s1, i1), expected)
    check_topk(s1, i1, q1, keys, 7, "ip", None)
    monkeypatch.setattr(naive, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(naive, "SCORE_BUDGET", 3 * 301 * 2)  # chunks of 2, 2 and 1 query rows
    long_q = torch.randn(1, 3, 5, 16)
    s, i = knn_search_naive(long_q, keys, 7)
    check_topk(s, i, long_q, keys, 7, "ip", None)
    monkeypatch.setattr(naive, "KEPT_SCORE_ELEMENTS", 0)  # every block fresh: the same results
    torch.testing.assert_close(knn_search_naive(long_q, keys, 7), (s, i))
