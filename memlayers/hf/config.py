"""Attachment configs: one dataclass per memory kind, validated when built.

Layers are chosen by index (negative counts from the end) or by a filter ``fn(index, layer) -> bool``
called on every decoder layer. Configs round-trip through ``to_dict``/``from_dict`` (JSON) so that a
saved model re-attaches the same memories; a filter function cannot be saved, so the resolved indices
are what gets stored.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Union

from ..layers.knn_read import COMBINES, DEFAULT_CAPACITY, DEFAULT_FIXED_DISTANCE, DEFAULT_TOP_K, POSITIONS
from ..layers.names import knn_index, renamed
from ..ops.utils import check_choice, check_positive_int

LayerSpec = Union[None, int, Sequence[int], Callable]

METRICS = ("ip", "cosine", "l2")
BACKENDS = ("auto", "torch", "triton")
DTYPES = (None, "float32", "float16", "bfloat16")


def _check_layers(layers) -> None:
    if layers is None or callable(layers):
        return
    if isinstance(layers, bool):
        raise TypeError("layers must be an int, a sequence of ints, a filter function or None, got bool")
    if isinstance(layers, int):
        return
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(f"layers must be an int, a sequence of ints, a filter function or None, got {type(layers).__name__}")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers must hold ints, got {i!r}")
    if not layers:
        raise ValueError("layers must not be empty")


def resolve_layers(layers: LayerSpec, decoder_layers) -> List[int]:
    """Indices (sorted, non-negative, unique) of the decoder layers that ``layers`` chooses."""
    n = len(decoder_layers)
    if layers is None:
        return list(range(n))
    if callable(layers):
        chosen = [i for i, layer in enumerate(decoder_layers) if layers(i, layer)]
        if not chosen:
            raise ValueError("layers: the filter function chose no decoder layer")
        return chosen
    raw = [layers] if isinstance(layers, int) else list(layers)
    out = []
    for i in raw:
        if not -n <= i < n:
            raise ValueError(f"layers: index {i} is out of range for a model with {n} decoder layers")
        out.append(i % n)
    if len(set(out)) != len(out):
        raise ValueError(f"layers: {raw} names a decoder layer twice")
    return sorted(out)


@dataclass
class _Base:
    layers: LayerSpec = None

    kind = ""
    deprecated = ()  # old field names, kept for one release
    runtime = ()  # fields that belong to this process (a process group): never saved

    def to_dict(self) -> Dict[str, object]:
        # Deprecated fields are translated by __post_init__ and left None: never saved.
        skip = set(self.deprecated) | set(self.runtime)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        if callable(d["layers"]):
            raise ValueError("a config whose layers is a filter function cannot be saved; resolve it first")
        if isinstance(d["layers"], tuple):
            d["layers"] = list(d["layers"])
        return {"kind": self.kind, **d}


@dataclass
class KNNMemoryConfig(_Base):
    """kNN memory in the attention of the chosen layers (Extended Mind / Memorizing Transformers).

    Each chosen layer's queries retrieve the ``top_k`` nearest of its own past (key, value) pairs
    (stored per batch row and kv-head, keys before rotary embedding) and attend to them.

    Args:
        layers: which decoder layers (None: all); indices, negative allowed, or ``fn(index, layer)``.
        top_k: memories retrieved per query and head.
        capacity: tokens kept per batch row; the oldest are evicted first.
        combine: ``"joint"``: memories and local context share one softmax (training-free, exact
            full-context attention when every memory is retrieved); ``"gate"``: two softmaxes mixed
            by a learned per-head gate ``sigmoid(g)`` (Memorizing Transformers), ``g = gate_init``.
        position: how retrieved keys are placed relative to the query (rotary models only; the
            policies of ``ml.KNNMemoryAttention``): ``"rotate"`` (rotate on read: each key rotated
            at its stored absolute position, exactly the full-context scores), ``"none"`` (memories
            carry no position: the query before rotary against the stored key), ``"fixed"`` (every
            memory at relative distance ``fixed_distance``, as in InfLLM).
        max_distance: under ``"rotate"``, the farthest a memory is placed from the end of the
            memorized text: older memories are read as if that close, so that relative distances stay
            within what the model was trained on however much is memorized. None: half the model's
            trained positions (``max_position_embeddings``; the other half leaves room for the local
            window and what is generated); 0: no limit (exact full-context scores at any distance).
        index: the store's search: ``"exact"`` (fused exact top-k) or a FAISS index ``"flat"``,
            ``"ivf"``, ``"hnsw"``.
        metric: retrieval score: ``"ip"``, ``"cosine"`` or ``"l2"``.
        backend: the compute backend of the kernels and the search: ``"auto"`` (Triton on CUDA),
            ``"torch"`` or ``"triton"``.
        dtype: the stores' dtype (None: the model's).
        gate_init: initial gate logit for ``combine="gate"``.
        fixed_distance: the relative distance of every memory under ``position="fixed"``.
        store: deprecated spelling of ``index`` (``"exact"|"faiss"``).
        process_group: a ``torch.distributed`` group to shard every layer's memory over (exact index
            only): ``capacity`` is then the global capacity, striped over the ranks, and every rank
            gets what one unsharded memory would give (``ml.KNNMemory``'s ``process_group``). It belongs
            to this process: ``save_pretrained`` does not save it (each rank saves its own shard).

    Defaults are ``ml.KNNMemoryAttention``'s (``memlayers.layers.knn_read`` says why).
    """

    top_k: int = DEFAULT_TOP_K
    capacity: int = DEFAULT_CAPACITY
    combine: str = "joint"
    position: str = "rotate"
    index: Optional[str] = None
    metric: str = "ip"
    backend: str = "auto"
    dtype: Optional[str] = None
    gate_init: float = 0.0
    fixed_distance: int = DEFAULT_FIXED_DISTANCE
    max_distance: Optional[int] = None
    store: Optional[str] = None
    process_group: Optional[object] = None

    kind = "knn"
    deprecated = ("store",)
    runtime = ("process_group",)

    def __post_init__(self):
        _check_layers(self.layers)
        self.index, self.store = knn_index("KNNMemoryConfig", self.index, "store", self.store), None
        check_positive_int("top_k", self.top_k)
        check_positive_int("capacity", self.capacity)
        check_choice("combine", self.combine, COMBINES)
        check_choice("position", self.position, POSITIONS)
        check_positive_int("fixed_distance", self.fixed_distance, minimum=0)
        if self.max_distance is not None:
            check_positive_int("max_distance", self.max_distance, minimum=0)
        check_choice("metric", self.metric, METRICS)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("dtype", self.dtype, DTYPES)
        if isinstance(self.gate_init, bool) or not isinstance(self.gate_init, (int, float)):
            raise TypeError(f"gate_init must be a float, got {type(self.gate_init).__name__}")
        if not math.isfinite(self.gate_init):
            raise ValueError(f"gate_init must be finite, got {self.gate_init}")
        if self.process_group is not None:
            import torch.distributed as dist

            if not isinstance(self.process_group, dist.ProcessGroup):
                raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                                f"{type(self.process_group).__name__}")
            if self.index != "exact":
                raise ValueError(f"process_group shards the exact index only, got index={self.index!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


@dataclass
class TitansMemoryConfig(_Base):
    """A Titans ``NeuralMemory`` branch added to the chosen decoder layers, behind a zero-initialized
    per-channel gate (the attached model starts out computing exactly what it computed before).

    The memory learns while ``memorize`` streams text through the model, and is read (not
    updated) by every other forward pass and by ``generate``. Arguments other than ``layers`` are
    ``ml.NeuralMemory``'s.
    """

    heads: int = 4
    head_dim: Optional[int] = None
    memory: str = "linear"
    depth: int = 2
    expansion: int = 2
    chunk_size: int = 64
    momentum: bool = True
    forget: bool = True
    conv_size: int = 4
    max_lr: float = 0.01
    backend: str = "auto"

    kind = "titans"

    def __post_init__(self):
        _check_layers(self.layers)
        check_positive_int("heads", self.heads)
        if self.head_dim is not None:
            check_positive_int("head_dim", self.head_dim)
        check_choice("memory", self.memory, ("linear", "mlp"))
        check_positive_int("depth", self.depth, minimum=2 if self.memory == "mlp" else 1)
        check_positive_int("expansion", self.expansion)
        check_positive_int("chunk_size", self.chunk_size)
        _check_bool("momentum", self.momentum)
        _check_bool("forget", self.forget)
        check_positive_int("conv_size", self.conv_size, minimum=0)
        if isinstance(self.max_lr, bool) or not isinstance(self.max_lr, (int, float)) or not (
                math.isfinite(self.max_lr) and self.max_lr > 0):
            raise ValueError(f"max_lr must be a finite float > 0, got {self.max_lr!r}")
        check_choice("backend", self.backend, BACKENDS)


@dataclass
class DKVBConfig(_Base):
    """A Discrete Key-Value Bottleneck on the chosen decoder layers' outputs: the hidden state is
    split into ``num_codebooks`` heads (after a fixed random projection to ``key_dim`` per head),
    each fetches the learnable value of its nearest frozen key, and the concatenated values join
    the hidden state behind a zero-initialized per-channel gate. ``num_codebooks`` must divide the
    model's hidden size (values are ``hidden // num_codebooks`` wide).
    """

    num_codebooks: int = 8
    num_keys: int = 512
    key_dim: int = 16
    top_k: int = 1
    backend: str = "auto"
    topk: Optional[int] = None

    kind = "dkvb"
    deprecated = ("topk",)

    def __post_init__(self):
        _check_layers(self.layers)
        self.top_k, self.topk = renamed("DKVBConfig", "topk", self.topk, "top_k", self.top_k, 1), None
        check_positive_int("num_codebooks", self.num_codebooks)
        check_positive_int("num_keys", self.num_keys)
        check_positive_int("key_dim", self.key_dim)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_keys:
            raise ValueError(f"top_k must be <= num_keys ({self.num_keys}), got {self.top_k}")
        check_choice("backend", self.backend, BACKENDS)


@dataclass
class PKMConfig(_Base):
    """A product-key memory added to the FFN output of the chosen decoder layers.

    Args:
        layers: which decoder layers (None: all); indices, negative allowed, or ``fn(index, layer)``.
        heads: query heads; their reads are summed.
        num_keys: half-keys per side; each layer's memory holds ``num_keys ** 2`` slots.
        top_k: slots read per head and token.
        value_dim: width of a slot; None: the model's hidden size (no output projection), else a
            frozen random projection maps the read to the hidden size.
        key_dim: query/key width (even); None: ``ProductKeyMemory``'s default.
        qk_norm: unit-norm queries and half-keys (Memory+); spreads the accesses over the slots.
        seed: seeds the random queries and keys, so that a saved recipe re-attaches the same hash.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` for the fused gather.
    """

    heads: int = 4
    num_keys: int = 256
    top_k: int = 32
    value_dim: Optional[int] = None
    key_dim: Optional[int] = None
    qk_norm: bool = True
    seed: int = 0
    backend: str = "auto"

    kind = "pkm"

    def __post_init__(self):
        _check_layers(self.layers)
        check_positive_int("heads", self.heads)
        check_positive_int("num_keys", self.num_keys, minimum=2)
        check_positive_int("top_k", self.top_k)
        if self.top_k > self.num_keys:
            raise ValueError(f"top_k must be <= num_keys ({self.num_keys}), got {self.top_k}")
        if self.value_dim is not None:
            check_positive_int("value_dim", self.value_dim)
        if self.key_dim is not None:
            check_positive_int("key_dim", self.key_dim, minimum=2)
            if self.key_dim % 2:
                raise ValueError(f"key_dim must be even (two halves), got {self.key_dim}")
        if not isinstance(self.qk_norm, bool):
            raise TypeError(f"qk_norm must be a bool, got {type(self.qk_norm).__name__}")
        check_positive_int("seed", self.seed, minimum=0)
        check_choice("backend", self.backend, BACKENDS)


CONFIG_KINDS = {"knn": KNNMemoryConfig, "titans": TitansMemoryConfig, "dkvb": DKVBConfig, "pkm": PKMConfig}


def config_from_dict(d: Dict[str, object]):
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in CONFIG_KINDS:
        raise ValueError(f"unknown memory kind {kind!r}; known: {sorted(CONFIG_KINDS)}")
    return CONFIG_KINDS[kind](**d)


def is_config(obj) -> bool:
    return isinstance(obj, _Base)


__all__ = ["KNNMemoryConfig", "TitansMemoryConfig", "DKVBConfig", "PKMConfig", "resolve_layers", "config_from_dict", "is_config", "CONFIG_KINDS"]
