"""Discrete Key-Value Bottleneck (Träuble et al., ICML 2023).

An input (typically a frozen encoder's feature) is split into C low-dimensional heads; in each
codebook the nearest of N *frozen* keys is found and the *learnable* value paired with it is fetched.
A decoder maps the fetched values to the output. Only fetched values receive gradient, so training on
a new task leaves the values of unrelated regions of input space untouched: the bottleneck resists
catastrophic forgetting without replay.

Life cycle: build -> ``init_keys(unlabeled batches)`` (EMA k-means with dead-key replacement) ->
``freeze_keys()`` -> train the values (and decoder) task after task.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dkvb import dkvb_lookup
from .learned_memory import LearnedMemory
from .names import renamed, warn_renamed
from ..ops.utils import FLOAT_DTYPES, check_choice, check_finite, check_positive_int, check_tensor

SPLITTERS = ("chunk", "random", "learned")
DECODERS = ("vote", "mlp", "none")


class DiscreteKeyValueBottleneck(nn.Module, LearnedMemory):
    """Discrete key-value bottleneck with C codebooks of N (frozen key, learnable value) pairs.

    Args:
        dim: input feature size.
        num_codebooks: C.
        num_keys: N, pairs per codebook.
        key_dim: Dk, size of each codebook's key; ``None`` with ``splitter="chunk"`` means ``dim // C``.
        value_dim: Dv. With ``decoder="vote"`` this is the number of classes (values are logits).
        top_k: keys fetched per codebook (their values are averaged).
        splitter: how the input becomes ``[B, C, Dk]`` queries: ``"chunk"`` (consecutive slices of the
            input, needs ``dim == C * Dk``), ``"random"`` (a fixed Gaussian projection, a buffer),
            ``"learned"`` (a linear map; it gets gradient only from the commitment loss returned with
            ``return_info=True``, since the key choice is not differentiable), or any ``nn.Module``
            mapping ``[B, dim]`` to ``[B, C * Dk]`` or ``[B, C, Dk]``.
        decoder: ``"vote"`` (non-parametric: the mean over codebooks of the fetched values, used as
            logits; ``[B, Dv]``), ``"mlp"`` (flattened ``[B, C * Dv]`` -> hidden -> ``out_dim``),
            ``"none"`` (return ``[B, C, Dv]``), or any ``nn.Module`` taking ``[B, C, Dv]``.
        out_dim: output size of the ``"mlp"`` decoder.
        decoder_hidden: hidden width of the ``"mlp"`` decoder; 0 makes it linear.
        mask_untrained: at evaluation, search only among pairs selected at least once in training
            (a codebook with fewer than ``top_k`` trained pairs searches all its keys).
        deterministic: bitwise-reproducible value gradients in the Triton path.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the lookup.

    Shapes: ``forward(x)``: x ``[..., dim]`` -> ``[..., Dv]`` (vote), ``[..., out_dim]`` (mlp),
    ``[..., C, Dv]`` (none).

    Values start at zero for ``"vote"`` (untrained pairs vote for nobody) and N(0, 1) otherwise.
    Train with an optimizer that leaves zero-gradient parameters alone (plain SGD, or SparseAdam-like
    rules); Adam's momentum or weight decay would keep moving values of earlier tasks.

    Example:
        >>> import torch, memlayers as ml
        >>> dkvb = ml.DiscreteKeyValueBottleneck(dim=64, num_codebooks=16, num_keys=128, key_dim=8, value_dim=10)
        >>> stats = dkvb.init_keys([torch.randn(256, 64) for _ in range(4)])
        >>> dkvb.freeze_keys()
        >>> dkvb(torch.randn(32, 64)).shape
        torch.Size([32, 10])
    """

    def __init__(
        self,
        dim: int,
        num_codebooks: int,
        num_keys: int,
        key_dim: Optional[int] = None,
        value_dim: int = 16,
        top_k: int = 1,
        splitter: Union[str, nn.Module] = "random",
        decoder: Union[str, nn.Module] = "vote",
        out_dim: Optional[int] = None,
        decoder_hidden: int = 256,
        mask_untrained: bool = False,
        deterministic: bool = False,
        backend: str = "auto",
        topk: Optional[int] = None,
    ):
        super().__init__()
        top_k = renamed(type(self).__name__, "topk", topk, "top_k", top_k, 1)
        check_positive_int("dim", dim)
        check_positive_int("num_codebooks", num_codebooks)
        check_positive_int("num_keys", num_keys)
        check_positive_int("value_dim", value_dim)
        check_positive_int("top_k", top_k)
        if top_k > num_keys:
            raise ValueError(f"top_k must be <= num_keys ({num_keys}), got {top_k}")
        if not isinstance(splitter, nn.Module):
            check_choice("splitter", splitter, SPLITTERS)
        if not isinstance(decoder, nn.Module):
            check_choice("decoder", decoder, DECODERS)
        if key_dim is None:
            if splitter != "chunk":
                raise ValueError("key_dim is required unless splitter='chunk'")
            if dim % num_codebooks:
                raise ValueError(f"splitter='chunk' needs dim divisible by num_codebooks, got dim={dim}, num_codebooks={num_codebooks}")
            key_dim = dim // num_codebooks
        check_positive_int("key_dim", key_dim)
        if splitter == "chunk" and dim != num_codebooks * key_dim:
            raise ValueError(f"splitter='chunk' needs dim == num_codebooks * key_dim, got {dim} != {num_codebooks} * {key_dim}")
        if decoder == "mlp":
            if out_dim is None:
                raise ValueError("decoder='mlp' needs out_dim")
            check_positive_int("out_dim", out_dim)
            check_positive_int("decoder_hidden", decoder_hidden, minimum=0)

        self.dim, self.num_codebooks, self.num_keys = dim, num_codebooks, num_keys
        self.key_dim, self.value_dim, self.top_k = key_dim, value_dim, top_k
        self.mask_untrained, self.deterministic, self.backend = mask_untrained, deterministic, backend
        self.splitter_kind = splitter if isinstance(splitter, str) else "module"
        self.decoder_kind = decoder if isinstance(decoder, str) else "module"

        if isinstance(splitter, nn.Module):
            self.splitter = splitter
        elif splitter == "random":
            # Fixed, never trained: a buffer, saved with the model so that keys stay meaningful.
            self.register_buffer("projection", torch.randn(dim, num_codebooks * key_dim) / math.sqrt(dim))
        elif splitter == "learned":
            self.splitter = nn.Linear(dim, num_codebooks * key_dim, bias=False)

        self.register_buffer("keys", torch.randn(num_codebooks, num_keys, key_dim))
        self.register_buffer("keys_initialized", torch.tensor(False))
        self.register_buffer("keys_frozen", torch.tensor(False))
        self.register_buffer("counts", torch.zeros(num_codebooks, num_keys, dtype=torch.int64))
        init = torch.zeros if decoder == "vote" else torch.randn
        self.values = nn.Parameter(init(num_codebooks, num_keys, value_dim))

        if isinstance(decoder, nn.Module):
            self.decoder = decoder
        elif decoder == "mlp":
            flat = num_codebooks * value_dim
            layers = [nn.Flatten(1)]
            layers += [nn.Linear(flat, decoder_hidden), nn.GELU(), nn.Linear(decoder_hidden, out_dim)] if decoder_hidden else [nn.Linear(flat, out_dim)]
            self.decoder = nn.Sequential(*layers)

    # ---- input handling -------------------------------------------------------------------------
    def _check_input(self, name: str, x) -> torch.Tensor:
        check_tensor(name, x, dtypes=FLOAT_DTYPES, device=self.keys.device)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{name} must have shape [..., {self.dim}], got {tuple(x.shape)}")
        return x

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, dim]`` -> queries ``[B, C, Dk]`` (in the keys' dtype)."""
        B = x.shape[0]
        if self.splitter_kind == "chunk":
            q = x
        elif self.splitter_kind == "random":
            q = x.to(self.projection.dtype) @ self.projection
        else:
            q = self.splitter(x)
        return q.reshape(B, self.num_codebooks, self.key_dim).to(self.keys.dtype)

    def _eval_key_mask(self) -> Optional[torch.Tensor]:
        if self.training or not self.mask_untrained:
            return None
        trained = self.counts > 0
        too_few = trained.sum(dim=1, keepdim=True) < self.top_k
        return trained | too_few

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, return_info: bool = False):
        """x ``[..., dim]`` -> decoded output (see the class docstring for its shape).

        With ``return_info=True`` also returns a dict: ``indices [..., C, top_k]`` (selected keys),
        ``queries [..., C, Dk]``, and ``commitment_loss`` (mean squared distance of the queries to their
        nearest keys, differentiable w.r.t. a learned splitter; ``None`` for fixed splitters).
        """
        self._check_input("x", x)
        if self.training:
            check_finite("x", x)  # NaN would select arbitrary keys and corrupt the selection counts
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        q = self.split(flat)
        out, indices = dkvb_lookup(
            q.detach(), self.keys, self.values, self.top_k, self._eval_key_mask(), self.deterministic, self.backend
        )
        if self.training:
            with torch.no_grad():
                self.counts += self._selection_counts(indices)
        y = self._decode(out)
        y = y.reshape(*lead, *y.shape[1:])
        if not return_info:
            return y
        commitment = None
        if q.requires_grad:
            nearest = self.keys[torch.arange(self.num_codebooks, device=q.device), indices[..., 0]]
            commitment = F.mse_loss(q, nearest.to(q.dtype))
        info = {
            "indices": indices.reshape(*lead, self.num_codebooks, self.top_k),
            "queries": q.detach().reshape(*lead, self.num_codebooks, self.key_dim),
            "commitment_loss": commitment,
        }
        return y, info

    def _decode(self, fetched: torch.Tensor) -> torch.Tensor:
        if self.decoder_kind == "vote":
            return fetched.mean(dim=1)
        if self.decoder_kind == "none":
            return fetched
        return self.decoder(fetched)

    def _selection_counts(self, indices: torch.Tensor) -> torch.Tensor:
        C, N = self.num_codebooks, self.num_keys
        rows = indices + torch.arange(C, device=indices.device)[None, :, None] * N
        return torch.bincount(rows.reshape(-1), minlength=C * N).reshape(C, N)

    # ---- keys -----------------------------------------------------------------------------------
    def freeze_keys(self) -> None:
        """Freeze the keys: ``init_keys`` refuses to run afterwards (values stay trainable)."""
        self.keys_frozen.fill_(True)

    def reset_counts(self) -> None:
        """Forget how often each pair was selected (affects ``mask_untrained``)."""
        self.counts.zero_()

    @torch.no_grad()
    def init_keys(
        self,
        batches: Iterable,
        epochs: int = 1,
        decay: float = 0.9,
        dead_threshold: float = 0.1,
        kmeans_iters: int = 10,
    ) -> Dict[str, float]:
        """Fit the keys to (unlabeled) data, as in the paper: EMA k-means with dead-key replacement.

        The first batch seeds each codebook's keys with random queries of the batch refined by
        ``kmeans_iters`` Lloyd iterations (if the keys were never initialized); every batch then moves
        each key toward the exponential moving average (``decay``) of the queries assigned to it, with
        Laplace-smoothed counts as in VQ-VAE. A key whose EMA count falls below ``dead_threshold``
        times the average count is moved to a random query of the current batch.

        Nothing is written to the module until every batch went through: a bad batch raises and
        leaves the keys exactly as they were.

        Args:
            batches: iterable of ``x [..., dim]`` tensors or tuples/lists whose first item is one (a
                DataLoader works); re-iterable when ``epochs > 1``.
            epochs: passes over ``batches``.
            decay: EMA decay in ``[0, 1)``.
            dead_threshold: relative EMA count under which a key is replaced (0 disables).
            kmeans_iters: Lloyd iterations on the first batch when seeding.

        Returns:
            ``{"batches": int, "replaced": int, "used_fraction": float}`` (keys replaced over all batches,
            and the fraction of keys selected by the last batch).

        Example:
            >>> import torch, memlayers as ml
            >>> dkvb = ml.DiscreteKeyValueBottleneck(2, num_codebooks=4, num_keys=32, key_dim=2, value_dim=3)
            >>> stats = dkvb.init_keys([torch.rand(128, 2) for _ in range(10)])
            >>> stats["batches"]
            10
        """
        if bool(self.keys_frozen):
            raise RuntimeError("keys are frozen (freeze_keys() was called); init_keys would change them")
        check_positive_int("epochs", epochs)
        check_positive_int("kmeans_iters", kmeans_iters, minimum=0)
        if not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        if not isinstance(dead_threshold, (int, float)) or dead_threshold < 0:
            raise ValueError(f"dead_threshold must be a float >= 0, got {dead_threshold!r}")
        if epochs > 1 and iter(batches) is batches:
            batches = list(batches)  # a one-shot iterator cannot be passed over twice

        C, N, Dk = self.keys.shape
        keys = self.keys.detach().clone().float()
        initialized = bool(self.keys_initialized)
        ema_count = ema_sum = None
        seen = replaced = 0
        used = 0.0
        for _ in range(epochs):
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                name = f"batches[{seen}]"
                self._check_input(name, x)
                check_finite(name, x)
                q = self.split(x.reshape(-1, self.dim)).float()  # [B, C, Dk]
                if q.shape[0] == 0:
                    raise ValueError(f"{name} is empty")
                if not initialized:
                    keys, initialized = self._seed_keys(q, kmeans_iters), True
                if ema_count is None:
                    # Start the averages as if every key had seen its share of one batch.
                    ema_count = torch.full((C, N), q.shape[0] / N, device=keys.device)
                    ema_sum = keys * ema_count[..., None]
                assign = self._nearest(q, keys)  # [B, C]
                counts, sums = self._cluster_stats(q, assign, N)
                ema_count.mul_(decay).add_(counts, alpha=1 - decay)
                ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
                total = ema_count.sum(dim=1, keepdim=True)
                smoothed = (ema_count + 1e-5) / (total + N * 1e-5) * total
                keys = ema_sum / smoothed[..., None]
                if dead_threshold > 0:
                    dead = ema_count < dead_threshold * total / N
                    replaced += int(dead.sum())
                    keys, ema_sum, ema_count = self._replace_dead(q, keys, ema_sum, ema_count, dead, total / N)
                used = float((counts > 0).float().mean())
                seen += 1
        if seen == 0:
            raise ValueError("batches yielded no batch")
        self.keys.copy_(keys.to(self.keys.dtype))
        self.keys_initialized.fill_(True)
        return {"batches": seen, "replaced": replaced, "used_fraction": used}

    def _nearest(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [B, C, Dk], keys [C, N, Dk] -> [B, C] index of the nearest key (fused kernel on GPU)."""
        placeholder = torch.zeros(keys.shape[0], keys.shape[1], 1, device=keys.device)
        _, idx = dkvb_lookup(q, keys, placeholder, 1, backend=self.backend)
        return idx[..., 0]

    @staticmethod
    def _cluster_stats(q: torch.Tensor, assign: torch.Tensor, N: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per codebook: how many queries each key got ``[C, N]`` and their sum ``[C, N, Dk]``."""
        B, C, Dk = q.shape
        rows = (assign + torch.arange(C, device=q.device)[None, :] * N).reshape(-1)
        counts = torch.bincount(rows, minlength=C * N).reshape(C, N).float()
        sums = torch.zeros(C * N, Dk, device=q.device).index_add_(0, rows, q.reshape(-1, Dk))
        return counts, sums.reshape(C, N, Dk)

    def _seed_keys(self, q: torch.Tensor, iters: int) -> torch.Tensor:
        B, C, Dk = q.shape
        N = self.num_keys
        pick = torch.randint(0, B, (C, N), device=q.device) if B < N else torch.rand(C, B, device=q.device).argsort(dim=1)[:, :N]
        keys = q.permute(1, 0, 2).gather(1, pick[..., None].expand(C, N, Dk)).clone()
        for _ in range(iters):
            counts, sums = self._cluster_stats(q, self._nearest(q, keys), N)
            hit = counts > 0
            keys = torch.where(hit[..., None], sums / counts.clamp_min(1)[..., None], keys)
        return keys

    @staticmethod
    def _replace_dead(q, keys, ema_sum, ema_count, dead, mean_count):
        if not bool(dead.any()):
            return keys, ema_sum, ema_count
        B, C, Dk = q.shape
        N = keys.shape[1]
        pick = torch.randint(0, B, (C, N), device=q.device)
        samples = q.permute(1, 0, 2).gather(1, pick[..., None].expand(C, N, Dk))
        # A replaced key restarts as if it had seen one average batch of its new sample.
        new_count = mean_count.expand(C, N)
        keys = torch.where(dead[..., None], samples, keys)
        ema_count = torch.where(dead, new_count, ema_count)
        ema_sum = torch.where(dead[..., None], samples * new_count[..., None], ema_sum)
        return keys, ema_sum, ema_count

    @property
    def topk(self) -> int:
        """Deprecated spelling of ``top_k``."""
        warn_renamed(type(self).__name__, "topk", "top_k", stacklevel=2)
        return self.top_k

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_codebooks={self.num_codebooks}, num_keys={self.num_keys}, key_dim={self.key_dim}, "
            f"value_dim={self.value_dim}, top_k={self.top_k}, splitter={self.splitter_kind!r}, decoder={self.decoder_kind!r}"
        )


__all__ = ["DiscreteKeyValueBottleneck"]
