"""Exact top-k search in plain PyTorch: the specification of the Triton kernel and the CPU path.

Scores are "higher is better" in every metric:
- ``ip``:     q . k
- ``cosine``: q . k / (||q|| ||k||)   (norms clamped below by 1e-12)
- ``l2``:     -||q - k||^2

It is also the path CPU users run, so it is shaped for CPU BLAS (choices measured with
``python bench/run.py --op knn_search`` on a 2-core AMD EPYC with MKL):
- Query rows are scored a chunk at a time into one reusable buffer: the T x M score matrix of a long
  query sequence never exists whole, and page faults on a fresh buffer per chunk are avoided. A
  CPU block of up to ``KEPT_SCORE_ELEMENTS`` is kept between calls (per thread): a decode step's
  block (9 rows x 16K slots, 590 KB) is a fresh mmap per call otherwise, page-faulted anew each
  step (9 queries, 3 kv-heads, k 64, dim-major, 1 thread, interleaved medians: 16K slots 2.57 ->
  2.34 ms, 64K 9.49 -> 9.23 ms, 4K unchanged).
- A few query rows per kv-head (decode) are scored with one product too: it reads the keys once,
  where a GEMV per row reads them once per row (3 rows x 16K dim-major slots, 2-core Xeon: 0.57
  ms against 1.9 ms; slot-major keys gain as much).
- Keys laid out dim-major (``KNNMemory``'s layout on CPU: a ``[B, H, C, D]`` view of a
  ``[B, H, D, C]`` buffer) turn each product into a contiguous GEMV over the slots, 2-3x faster
  than dot products over slot-major rows from 64K slots up. Any layout is accepted.
- Score rows of 8k slots and more are selected in two stages (``_select_topk``), so the sort sees a
  fraction of them.
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Tuple

import torch

NORM_EPS = 1e-12
SCORE_BUDGET = 1 << 24   # score elements per chunk (64 MB fp32) ...
MIN_CHUNK_ROWS = 128     # ... unless that leaves GEMMs too thin to run at speed ...
SCORE_CAP = 1 << 26      # ... but never more than 256 MB.
GROUPED_SELECT_MIN_GROUP = 4  # two-stage selection once its groups hold this many slots (M >= 8k) ...
GROUPED_SELECT_MIN_SCORES = 1 << 16  # ... in a score block this large: below, its dozen extra ops cost more
KEPT_SCORE_ELEMENTS = 1 << 22  # the largest CPU score block kept between calls (16 MB fp32, per thread)

_kept = threading.local()


def _score_block(shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialized fp32 tensor of ``shape`` on ``like``'s device. On CPU, blocks of at most
    ``KEPT_SCORE_ELEMENTS`` are views of one per-thread buffer that outlives the call: nothing
    computed from a block may keep a view of it (the callers keep topk results, which are copies)."""
    n = math.prod(shape)
    if like.device.type != "cpu" or n > KEPT_SCORE_ELEMENTS:
        return like.new_empty(shape)
    buf = getattr(_kept, "scores", None)
    if buf is None or buf.numel() < n:
        buf = _kept.scores = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(shape)


def _select_topk(s: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(s, k, dim=-1)`` (sorted), in two stages for long rows.

    Slots are cut into ``M // g`` groups of ``g`` (about sqrt(M / k)), strided: group j holds slots
    j, j + M // g, ... (its maximum is then one elementwise max over g contiguous slices, where a max
    over contiguous runs of g is several times slower on CPU). The k groups with the highest maxima
    hold every top-k score (a score in the top k has fewer than k larger scores, so fewer than k groups
    have a larger maximum than its own group), so the top k of those k * g candidates, and of the
    ``M % g`` slots past the last whole group, is exact up to ties. torch.topk costs tens of ns per
    element on CPU: this sorts M / g + k * g of them per row instead of M (SmolLM2 memorize chunk,
    4608 rows x 1024 slots: 69 -> 37 ms; decode, 9 rows x 16K slots: 0.59 -> 0.29 ms; 1 thread, load 2.4).
    A small block is sorted whole: 9 rows x 1024 slots take 0.012 ms in one topk, 0.042 ms in two stages.
    """
    M = s.shape[-1]
    g = 1 << max(0, round(math.log2(max(1.0, math.sqrt(M / k)))))
    n = M // g  # groups
    if g < GROUPED_SELECT_MIN_GROUP or n < k or s.numel() < GROUPED_SELECT_MIN_SCORES:
        return torch.topk(s, k, dim=-1, sorted=True)
    lead = s.shape[:-1]
    grouped = s[..., : n * g].view(*lead, g, n)
    groups = torch.topk(grouped.amax(-2), k, dim=-1, sorted=False).indices            # [..., k]
    cand = grouped.gather(-1, groups[..., None, :].expand(*lead, g, k)).view(*lead, g * k)
    top_s, at = torch.topk(torch.cat([cand, s[..., n * g:]], dim=-1), k, dim=-1, sorted=True)
    in_groups = at < g * k
    slot = (at // k) * n + groups.gather(-1, (at % k).clamp_max(k - 1))
    return top_s, torch.where(in_groups, slot, at - g * k + n * g)


def _chunk_rows(rows: int, pairs: int, M: int) -> int:
    """Query rows per chunk when ``pairs`` (batch row, kv-head) pairs each score ``M`` slots."""
    n = max(SCORE_BUDGET // (pairs * M), MIN_CHUNK_ROWS // pairs)
    return max(1, min(rows, n, SCORE_CAP // (pairs * M)))


def knn_search_naive(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    valid_lengths: Optional[torch.Tensor] = None,
    metric: str = "ip",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [B, Hq, T, D], keys [B, Hkv, M, D] -> (scores [B, Hq, T, k] fp32, indices [B, Hq, T, k] int64).

    Sorted best first; slots at or past ``valid_lengths`` ([B] or [B, Hkv]) and slots whose score is
    NaN are never returned; missing results are (score -inf, index -1). Not differentiable, like the
    Triton path.
    """
    B, Hq, T, D = queries.shape
    Hkv, M = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    rows = group * T
    # Query heads hq = hkv * group + g share kv-head hkv: fold the group into the rows.
    q = queries.detach().float().reshape(B, Hkv, rows, D)
    kf = keys.detach().float()  # keeps the keys' layout (a no-op for fp32)
    key_sq = None
    if metric == "cosine":
        kf = kf / kf.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    elif metric == "l2":
        key_sq = kf.pow(2).sum(-1).unsqueeze(-2)  # [B, Hkv, 1, M]
    kt = kf.transpose(-1, -2)  # [B, Hkv, D, M]: contiguous when the keys are dim-major

    invalid = None
    if valid_lengths is not None:
        lengths = valid_lengths.to(device=keys.device, dtype=torch.long)
        if lengths.dim() == 1:
            lengths = lengths[:, None].expand(B, Hkv)
        invalid = (torch.arange(M, device=keys.device) >= lengths[..., None]).unsqueeze(-2)  # [B, Hkv, 1, M]

    kk = min(k, M)
    if M == 0 or rows == 0:
        scores = q.new_full((B, Hkv, rows, 0), float("-inf"))
        idx = torch.zeros((B, Hkv, rows, 0), dtype=torch.long, device=q.device)
    else:
        chunk = _chunk_rows(rows, B * Hkv, M)
        buf = _score_block((B, Hkv, chunk, M), q)
        out_s, out_i = [], []
        for start in range(0, rows, chunk):
            qc = q[:, :, start : start + chunk]
            s = torch.matmul(qc, kt, out=buf if qc.shape[2] == chunk else _score_block((B, Hkv, qc.shape[2], M), q))
            if metric == "l2":
                s.mul_(2).sub_(qc.pow(2).sum(-1, keepdim=True)).sub_(key_sq)
            # A NaN score (NaN in the query or the key, inf - inf) is no match: -inf, never ahead of a number.
            torch.nan_to_num_(s, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
            if invalid is not None:
                s.masked_fill_(invalid, float("-inf"))
            top_s, top_i = _select_topk(s, kk)
            out_s.append(top_s)
            out_i.append(top_i)
        # One chunk (every decode step) needs no copy into a joined tensor.
        scores, idx = (out_s[0], out_i[0]) if len(out_s) == 1 else (torch.cat(out_s, dim=2), torch.cat(out_i, dim=2))
    if kk < k:
        pad = k - kk
        scores = torch.cat([scores, scores.new_full((B, Hkv, rows, pad), float("-inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_full((B, Hkv, rows, pad), -1)], dim=-1)
    idx = idx.masked_fill(scores == float("-inf"), -1)
    return scores.reshape(B, Hq, T, k), idx.reshape(B, Hq, T, k)
