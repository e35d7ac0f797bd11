"""Titans test-time memory in plain PyTorch: the specification of the kernels and the CPU path.

Per batch row and head, a memory ``M`` (a linear map ``x W`` or the residual MLP
``x + silu(... silu(x W_1) ...) W_L``) is trained while the sequence is read. For token ``t``::

    l_t   = loss(M_{t-1}(k_t) - v_t)                  # attentional bias: "l2", "lp" or "huber"
    S_t   = eta_t * S_{t-1} - theta_t * grad_W l_t     # surprise with momentum (S_t = -theta_t grad without)
    W_t   = (1 - alpha_t) * W_{t-1} + S_t              # retention as weight decay (forgetting)
    y_t   = M_t(q_t)                                   # retrieval with the memory that has read token t

``titans_recurrent_naive`` is that loop, with gradients taken by autograd of the loss: the
specification. ``titans_chunked_naive`` is the parallel mini-batch form the kernels compute: inside
a chunk of ``C`` tokens every gradient is taken at the chunk-start weights ``W_0``, so the recurrence
unrolls into cumulative products of the gates::

    A_i = prod_{l<=i} (1 - alpha_l)         B_i = prod_{l<=i} eta_l          (plain products)
    c_ij = sum_{j<=m<=i} (A_i / A_m) (B_m / B_j)      d_i = sum_{m<=i} (A_i / A_m) B_m
    W_i = A_i W_0 + d_i S_0 - sum_{j<=i} c_ij theta_j G_j,     G_j = grad of l_j at W_0
    S_i = B_i S_0 - sum_{j<=i} (B_i / B_j) theta_j G_j

and each layer's retrieval ``x_i W_i`` becomes masked matmuls over the chunk. With ``C = 1`` the two
forms are the same computation. Everything is computed in fp32.

Losses of the attentional bias (``r = M(k) - v``, summed over features):
- ``"l2"`` (Titans):   ``r^2``                                    gradient ``2 r``
- ``"lp"`` (Moneta):   ``(r^2 + eps)^(p/2)`` (smoothed ``|r|^p``)  gradient ``p r (r^2 + eps)^(p/2 - 1)``
- ``"huber"`` (Yaad):  ``r^2`` if ``|r| <= delta`` else ``2 delta |r| - delta^2``   gradient ``2 clamp(r, -delta, delta)``
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

BIASES = ("l2", "lp", "huber")
State = Tuple[torch.Tensor, ...]


def bias_loss(r: torch.Tensor, bias: str, p: float, delta: float, eps: float) -> torch.Tensor:
    """Summed attentional-bias loss of residuals ``r`` (any shape) -> scalar."""
    if bias == "l2":
        return (r * r).sum()
    if bias == "lp":
        return (r * r + eps).pow(p / 2).sum()
    a = r.abs()
    return torch.where(a <= delta, r * r, 2 * delta * a - delta * delta).sum()


def bias_grad(r: torch.Tensor, bias: str, p: float, delta: float, eps: float) -> torch.Tensor:
    """Elementwise derivative of ``bias_loss`` with respect to ``r``."""
    if bias == "l2":
        return 2 * r
    if bias == "lp":
        return p * r * (r * r + eps).pow(p / 2 - 1)
    return 2 * r.clamp(-delta, delta)


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def memory_apply(weights: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Evaluate the memory on ``x [..., Dk]``: ``x W`` (one weight) or ``x + silu(...)W_L`` (MLP)."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.silu(h)
    return h if len(weights) == 1 else x + h


def _per_token_grads(weights, k, v, bias, p, delta, eps):
    """Inputs ``X_l`` and output gradients ``D_l`` of each layer on the keys, at fixed weights.

    Token j's gradient of its loss for layer l is the outer product ``X_l[j]^T D_l[j]``.
    """
    xs, zs = [], []
    h = k
    for i, w in enumerate(weights):
        xs.append(h)
        z = h @ w
        zs.append(z)
        h = F.silu(z) if i < len(weights) - 1 else z
    pred = h if len(weights) == 1 else k + h
    delta_out = bias_grad(pred - v, bias, p, delta, eps)
    ds = [delta_out]
    for i in range(len(weights) - 1, 0, -1):
        delta_out = (delta_out @ weights[i].transpose(-1, -2)) * silu_grad(zs[i - 1])
        ds.append(delta_out)
    return xs, ds[::-1]


def _gate_products(gate: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Products of a chunk's gates ``[..., n]``: ``L [..., n, n]`` and ``P [..., n]``.

    ``L_ij = prod_{j<m<=i} gate_m`` for ``j <= i`` (1 on the diagonal, 0 above it) and
    ``P_i = prod_{m<=i} gate_m``. Plain products, never logs or ratios: a gate of exactly 0 (full
    forgetting, no momentum) keeps its exact gradient, which no division by the gate could give.
    """
    n = gate.shape[-1]
    idx = torch.arange(n, device=gate.device)
    # Row i holds gate_m for m <= i and 1 after; a reversed cumprod gives prod_{j<=m<=i} gate_m.
    rows = torch.where(idx[None, :] <= idx[:, None], gate.unsqueeze(-2), torch.ones_like(gate).unsqueeze(-2))
    suffix = rows.flip(-1).cumprod(-1).flip(-1)
    upper = torch.cat([suffix[..., 1:], torch.ones_like(suffix[..., :1])], -1)
    L = torch.where(idx[None, :] <= idx[:, None], upper, torch.zeros_like(upper))
    return L, suffix[..., 0]


def titans_chunked_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: Optional[torch.Tensor],
    eta: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    momentum: Optional[Sequence[torch.Tensor]],
    chunk_size: int = 64,
    bias: str = "l2",
    p: float = 3.0,
    delta: float = 1.0,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, State, Optional[State]]:
    """Chunked Titans memory (the kernels' computation), differentiable by autograd.

    Shapes: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, ``theta, alpha, eta [B, H, T]``,
    ``weights`` layer matrices ``[B, H, D_in, D_out]`` (one: linear ``Dk x Dv``; several: residual
    MLP with ``Dk == Dv``), ``momentum`` same shapes as ``weights`` or None when ``eta`` is None.
    Returns ``(y [B, H, T, Dv] fp32, final weights, final momentum or None)``.
    """
    W = [w.float() for w in weights]
    S = [s.float() for s in momentum] if eta is not None else None
    qf, kf, vf, th = q.float(), k.float(), v.float(), theta.float()
    T = q.shape[2]
    if T == 0:
        # No token: the memory is unchanged (returned as copies, never the caller's tensors); y has no
        # rows but stays connected to every input, so each one gets its (empty or zero) gradient.
        unused = sum(t.sum() for t in (kf, vf, th, alpha, eta) if t is not None)
        y = memory_apply(W, qf) + 0 * unused
        return y, tuple(w.clone() for w in W), (tuple(s.clone() for s in S) if S is not None else None)
    ys = []
    for start in range(0, T, chunk_size):
        sl = slice(start, min(T, start + chunk_size))
        Q, K, V, TH = qf[:, :, sl], kf[:, :, sl], vf[:, :, sl], th[:, :, sl]
        keep = 1 - alpha[:, :, sl].float() if alpha is not None else torch.ones_like(TH)
        LA, A = _gate_products(keep)
        if S is not None:
            LB, Bp = _gate_products(eta[:, :, sl].float())
            c = LA @ LB
            d = (LA @ Bp.unsqueeze(-1)).squeeze(-1)
            s_end = LB[..., -1, :] * TH
        else:
            c = LA
        ctheta = c * TH.unsqueeze(-2)
        xs, ds = _per_token_grads(W, K, V, bias, p, delta, eps)
        h = Q
        for i in range(len(W)):
            z = A.unsqueeze(-1) * (h @ W[i]) - ((h @ xs[i].transpose(-1, -2)) * ctheta) @ ds[i]
            if S is not None:
                z = z + d.unsqueeze(-1) * (h @ S[i])
            h = F.silu(z) if i < len(W) - 1 else z
        ys.append(h if len(W) == 1 else Q + h)
        # States after the chunk's last token.
        w_end = ctheta[..., -1, :].unsqueeze(-1)
        a_end = A[..., -1, None, None]
        newW = [a_end * W[i] - xs[i].transpose(-1, -2) @ (w_end * ds[i]) for i in range(len(W))]
        if S is not None:
            d_end = d[..., -1, None, None]
            b_end = Bp[..., -1, None, None]
            newW = [nw + d_end * s for nw, s in zip(newW, S)]
            S = [b_end * S[i] - xs[i].transpose(-1, -2) @ (s_end.unsqueeze(-1) * ds[i]) for i in range(len(W))]
        W = newW
    return torch.cat(ys, dim=2), tuple(W), (tuple(S) if S is not None else None)


def titans_recurrent_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    alpha: Optional[torch.Tensor],
    eta: Optional[torch.Tensor],
    weights: Sequence[torch.Tensor],
    momentum: Optional[Sequence[torch.Tensor]],
    bias: str = "l2",
    p: float = 3.0,
    delta: float = 1.0,
    eps: float = 1e-6,
) -> Tuple[torch.Tensor, State, Optional[State]]:
    """Token-by-token Titans recurrence, the specification (slow: a Python loop over tokens).

    Same arguments and returns as ``titans_chunked_naive`` (without ``chunk_size``). The gradient of
    each token's loss is taken by autograd; with outer gradients enabled it keeps the graph
    (second order), so outer gradients of the whole recurrence are exact.
    """
    outer = torch.is_grad_enabled()
    B, H, T, _ = q.shape
    with torch.enable_grad():
        W = [w.float() if w.requires_grad else w.float().clone().requires_grad_(True) for w in weights]
        S = [s.float() for s in momentum] if eta is not None else None
        ys = []
        for t in range(T):
            kt, vt = k[:, :, t].float().unsqueeze(-2), v[:, :, t].float().unsqueeze(-2)
            loss = bias_loss(memory_apply(W, kt) - vt, bias, p, delta, eps)
            grads = torch.autograd.grad(loss, W, create_graph=outer)
            th = theta[:, :, t, None, None].float()
            if S is None:
                upd = [-th * g for g in grads]
            else:
                et = eta[:, :, t, None, None].float()
                S = [et * s - th * g for s, g in zip(S, grads)]
                upd = S
            keep = 1.0 if alpha is None else 1 - alpha[:, :, t, None, None].float()
            W = [keep * w + u for w, u in zip(W, upd)]
            ys.append(memory_apply(W, q[:, :, t].float().unsqueeze(-2)))
        y = torch.cat(ys, dim=2) if ys else q.new_zeros(B, H, 0, v.shape[-1], dtype=torch.float32)
    if not outer:
        y = y.detach()
        W = [w.detach() for w in W]
        S = [s.detach() for s in S] if S is not None else None
    return y, tuple(W), (tuple(S) if S is not None else None)
