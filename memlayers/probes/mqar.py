"""Multi-query associative recall (MQAR, Zoology's definition) for modules and models without a
tokenizer.

A sequence starts with ``num_kv_pairs`` key-value pairs (keys from the first half of the vocabulary,
values from the second), then each key is asked once at a gap drawn from a power law
(``p(g) ~ g**(power_a - 1)``: most queries come soon, a few come late). The model must predict the
value right after each asked key; every other position is unscored (label ``-100``).

Example:
    >>> data = mqar_data(num_examples=8, seq_len=64, vocab_size=128, num_kv_pairs=4)
    >>> data.inputs.shape, int((data.labels != -100).sum(1)[0])
    (torch.Size([8, 64]), 4)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from ..ops.utils import check_finite, check_positive_int, check_tensor

IGNORE = -100


@dataclass
class MQARBatch:
    """MQAR examples.

    Attributes:
        inputs: ``[N, T]`` int64 token ids.
        labels: ``[N, T]`` int64, the value to predict after the key at that position, else ``-100``.
        query_positions: ``[N, K]`` int64, where key ``j`` is asked (its label's position).
        distances: ``[N, K]`` int64, tokens from key ``j``'s pair to the position that asks it.
        vocab_size, num_kv_pairs: the generation settings.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    query_positions: torch.Tensor
    distances: torch.Tensor
    vocab_size: int
    num_kv_pairs: int


def mqar_data(
    num_examples: int,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    *,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> MQARBatch:
    """Zoology's MQAR examples, deterministic given ``seed``.

    Args:
        num_examples: N.
        seq_len: T, even, with ``4 * num_kv_pairs <= T < vocab_size``.
        vocab_size: keys come from ``1 .. vocab_size//2 - 1``, values from ``vocab_size//2 ..``.
        num_kv_pairs: K pairs per example, each asked exactly once.
        power_a: exponent of the gap distribution, in (0, 1]; smaller puts queries closer.
        random_non_queries: fill unasked positions with random tokens (Zoology's default) rather
            than token 0.
    """
    check_positive_int("num_examples", num_examples)
    check_positive_int("seq_len", seq_len, minimum=2)
    check_positive_int("vocab_size", vocab_size, minimum=4)
    check_positive_int("num_kv_pairs", num_kv_pairs)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must be larger than seq_len ({seq_len}), got {vocab_size}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"num_kv_pairs must be <= seq_len / 4 = {seq_len // 4}, got {num_kv_pairs}")
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not 0 < power_a <= 1:
        raise ValueError(f"power_a must be a float in (0, 1], got {power_a!r}")
    check_positive_int("seed", seed, minimum=0)

    g = torch.Generator().manual_seed(seed)
    half = vocab_size // 2
    N, K, T = num_examples, num_kv_pairs, seq_len
    # distinct keys (and values) per example: the first K of a random permutation
    keys = torch.rand(N, half - 1, generator=g).argsort(dim=1)[:, :K] + 1
    values = torch.rand(N, vocab_size - half, generator=g).argsort(dim=1)[:, :K] + half
    C = 2 * K
    kvs = torch.stack([keys, values], dim=2).reshape(N, C)

    space = (T - C) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(N, space), K, replacement=False, generator=g)
    queries = torch.zeros(N, T - C + 1, dtype=torch.int64).scatter_(1, 2 * gaps, keys)
    examples = torch.cat([kvs, queries], dim=1)
    labels = torch.full((N, T + 1), IGNORE, dtype=torch.int64).scatter_(1, 2 * gaps + C + 1, values)
    inputs, labels = examples[:, :-1].clone(), labels[:, 1:].clone()
    if random_non_queries:
        fill = torch.randint(vocab_size, inputs.shape, generator=g)
        inputs = torch.where(inputs == 0, fill, inputs)
    query_positions = C + 2 * gaps
    return MQARBatch(inputs, labels, query_positions, query_positions - 2 * torch.arange(K), vocab_size, K)


class MQARModel(nn.Module):
    """A small language model around any sequence mixers, as Zoology trains on MQAR.

    ``ids [B, T] -> embedding -> (x + mixer(norm(x)); x + mlp(norm(x))) per mixer -> norm -> logits
    [B, T, vocab_size]``. Each mixer maps ``[B, T, dim] -> [B, T, dim]`` (a tuple output counts by
    its first element) and must be causal for the probe to mean anything.

    Example:
        >>> model = MQARModel(nn.Identity(), vocab_size=128, dim=32)  # put a memory module here
        >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 128])
    """

    def __init__(self, mixers: Union[nn.Module, Sequence[nn.Module]], vocab_size: int, dim: int):
        super().__init__()
        check_positive_int("vocab_size", vocab_size, minimum=2)
        check_positive_int("dim", dim)
        mixers = [mixers] if isinstance(mixers, nn.Module) else list(mixers)
        if not mixers or not all(isinstance(m, nn.Module) for m in mixers):
            raise TypeError("mixers must be an nn.Module or a non-empty list of nn.Modules")
        self.embed = nn.Embedding(vocab_size, dim)
        self.mixers = nn.ModuleList(mixers)
        self.mixer_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in mixers)
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)) for _ in mixers
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_tensor("ids", ids, ndim=2, dtypes=(torch.int64, torch.int32))
        x = self.embed(ids)
        for mixer, norm, mlp in zip(self.mixers, self.mixer_norms, self.mlps):
            y = _first(mixer(norm(x)))
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                raise ValueError(f"mixer {type(mixer).__name__} must return shape {tuple(x.shape)}, got {_shape(y)}")
            x = x + y
            x = x + mlp(x)
        return self.head(self.norm(x))


def _first(out):
    if isinstance(out, (tuple, list)):
        return out[0]
    return getattr(out, "logits", out)


def _shape(y):
    return tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__


@dataclass
class MQARResult:
    """Accuracy over the asked keys, overall and by recall distance (tokens between a pair and the
    query; buckets ``[2**i, 2**(i+1))`` keyed by their lower bound)."""

    accuracy: float
    correct: int
    total: int
    by_distance: Dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_mqar(
    model: nn.Module,
    data: MQARBatch,
    *,
    batch_size: int = 64,
    embedding: Optional[Union[torch.Tensor, nn.Embedding]] = None,
    device: Optional[Union[str, torch.device]] = None,
    before_batch: Optional[Callable[[], None]] = None,
) -> MQARResult:
    """Run ``model`` on MQAR examples and score the prediction after every asked key.

    Two kinds of model:
      - ``embedding=None``: ``model(ids [B, T]) -> logits [B, T, V]`` (a tensor, a tuple whose first
        element is, or an object with ``.logits``, as HuggingFace models return); ``V >= vocab_size``.
        The prediction is the argmax.
      - ``embedding`` given (``[V, dim]`` tensor or ``nn.Embedding``): ``model(x [B, T, dim]) ->
        [B, T, dim]`` where ``x = embedding[ids]``; a bare memory module. The prediction is the value
        token whose embedding has the largest dot product with the output.

    The model is put in eval mode. A model that keeps state between calls (an attached memory)
    should be cleared by ``before_batch``, called before every batch, so batches stay independent.

    Example:
        >>> data = mqar_data(64, 64, 128, 4)
        >>> evaluate_mqar(MQARModel(nn.Identity(), 128, 16), data).accuracy  # doctest: +SKIP
        0.0
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(data, MQARBatch):
        raise TypeError(f"data must be an MQARBatch (see mqar_data), got {type(data).__name__}")
    check_positive_int("batch_size", batch_size)
    table = None
    if embedding is not None:
        table = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        check_tensor("embedding", table, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if table.shape[0] < data.vocab_size:
            raise ValueError(f"embedding must have at least vocab_size={data.vocab_size} rows, got shape {tuple(table.shape)}")
        check_finite("embedding", table)
    if device is None:
        device = next((p.device for p in model.parameters()), table.device if table is not None else torch.device("cpu"))
    device = torch.device(device)

    model.eval()
    half = data.vocab_size // 2
    hits = torch.zeros_like(data.labels, dtype=torch.bool)
    for start in range(0, data.inputs.shape[0], batch_size):
        ids = data.inputs[start : start + batch_size].to(device)
        if before_batch is not None:
            before_batch()
        if table is None:
            out = _first(model(ids))
            if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != ids.shape or out.shape[2] < data.vocab_size:
                raise ValueError(f"model output must be logits [B, T, V>={data.vocab_size}] for ids {tuple(ids.shape)}, got {_shape(out)}")
            pred = out.float().argmax(-1)
        else:
            t = table.to(device)
            out = _first(model(t[ids]))
            if not isinstance(out, torch.Tensor) or out.shape != (*ids.shape, t.shape[1]):
                raise ValueError(f"model output must have shape {(*ids.shape, t.shape[1])}, got {_shape(out)}")
            pred = (out.float() @ t[half : data.vocab_size].float().T).argmax(-1) + half
        hits[start : start + batch_size] = pred.cpu() == data.labels[start : start + batch_size]

    asked = data.labels != IGNORE
    correct, total = int(hits[asked].sum()), int(asked.sum())
    per_query = hits.gather(1, data.query_positions).flatten()
    buckets = torch.floor(torch.log2(data.distances.clamp(min=1).double())).long().flatten()
    by_distance = {2 ** int(b): float(per_query[buckets == b].float().mean()) for b in buckets.unique().tolist()}
    return MQARResult(correct / total, correct, total, by_distance)


def train_mqar(
    model: nn.Module,
    *,
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    steps: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    power_a: float = 0.01,
    seed: int = 0,
) -> List[float]:
    """Train ``model`` (ids -> logits) on fresh MQAR batches with AdamW and cross-entropy on the
    asked positions only. Returns the loss of every step.

    The training data use seeds ``seed + 1 + step``, never an evaluation seed of ``0``..``seed``,
    so train and test examples differ."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_int("steps", steps)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    model.train()
    losses = []
    for step in range(steps):
        data = mqar_data(batch_size, seq_len, vocab_size, num_kv_pairs, power_a=power_a, seed=seed + 1 + step)
        logits = _first(model(data.inputs.to(device)))
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), data.labels.to(device).flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses
