"""Exact top-k search in plain PyTorch: the specification of the Triton kernel and the CPU path.

Scores are "higher is better" in every metric:
- ``ip``:     q . k
- ``cosine``: q . k / (||q|| ||k||)   (norms clamped below by 1e-12)
- ``l2``:     -||q - k||^2

Queries are processed in chunks so that the [chunk, M] score block stays near 64M elements
(256 MB fp32) however long the query sequence is; within a chunk it is one batched matmul and one
``torch.topk``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

NORM_EPS = 1e-12
SCORE_BLOCK_ELEMENTS = 1 << 26


def _scores(q: torch.Tensor, keys: torch.Tensor, metric: str, key_sq: Optional[torch.Tensor]) -> torch.Tensor:
    # q: [B, Hkv, R, D] fp32, keys: [B, Hkv, M, D] fp32 -> [B, Hkv, R, M]
    s = torch.matmul(q, keys.transpose(-1, -2))
    if metric == "cosine":
        qn = q.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        s = s / qn
    elif metric == "l2":
        s = 2 * s - q.pow(2).sum(-1, keepdim=True) - key_sq
    return s


def knn_search_naive(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    valid_lengths: Optional[torch.Tensor] = None,
    metric: str = "ip",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [B, Hq, T, D], keys [B, Hkv, M, D] -> (scores [B, Hq, T, k] fp32, indices [B, Hq, T, k] int64).

    Sorted best first; slots at or past ``valid_lengths`` ([B] or [B, Hkv]) are never returned;
    missing results are (score -inf, index -1).
    """
    B, Hq, T, D = queries.shape
    Hkv, M = keys.shape[1], keys.shape[2]
    group = Hq // Hkv
    # Query heads hq = hkv * group + g share kv-head hkv: fold the group into the rows.
    q = queries.float().reshape(B, Hkv, group * T, D)
    kf = keys.float()
    key_sq = None
    if metric == "cosine":
        kf = kf / kf.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
    elif metric == "l2":
        key_sq = kf.pow(2).sum(-1).unsqueeze(-2)  # [B, Hkv, 1, M]

    invalid = None
    if valid_lengths is not None:
        lengths = valid_lengths.to(device=keys.device, dtype=torch.long)
        if lengths.dim() == 1:
            lengths = lengths[:, None].expand(B, Hkv)
        invalid = torch.arange(M, device=keys.device) >= lengths[..., None]  # [B, Hkv, M]
        invalid = invalid.unsqueeze(-2)

    kk = min(k, M)
    rows = group * T
    chunk = max(1, SCORE_BLOCK_ELEMENTS // max(1, B * Hkv * M))
    out_s, out_i = [], []
    for start in range(0, rows, chunk):
        s = _scores(q[:, :, start : start + chunk], kf, metric, key_sq)
        if invalid is not None:
            s = s.masked_fill(invalid, float("-inf"))
        top_s, top_i = torch.topk(s, kk, dim=-1, sorted=True)
        out_s.append(top_s)
        out_i.append(top_i)
    scores = torch.cat(out_s, dim=2) if M > 0 else q.new_full((B, Hkv, rows, 0), float("-inf"))
    idx = torch.cat(out_i, dim=2) if M > 0 else torch.zeros((B, Hkv, rows, 0), dtype=torch.long, device=q.device)
    if kk < k:
        pad = k - kk
        scores = torch.cat([scores, scores.new_full((B, Hkv, rows, pad), float("-inf"))], dim=-1)
        idx = torch.cat([idx, idx.new_full((B, Hkv, rows, pad), -1)], dim=-1)
    idx = idx.masked_fill(scores == float("-inf"), -1)
    return scores.reshape(B, Hq, T, k), idx.reshape(B, Hq, T, k)
