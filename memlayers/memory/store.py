"""``KNNMemory``: a store of (key, value) pairs per batch row and kv-head, searched by exact top-k or FAISS.

Layout (the gpt-fast KV-cache shape: registered buffers, explicit setup):

    keys      [B, H, C, D]    values [B, H, C, Dv]   (keys are dim-major on CPU, see _key_layout)
    positions [B, C] int64    absolute token position of each slot (-1 while empty)
    count     [B]    int64    valid slots; slots 0..count-1 until the ring is full, then all C
    write_ptr [B]    int64    the next slot to write (ring-buffer FIFO eviction)
    next_position [B] int64   the position given to the next token added without explicit positions

A host-side int, ``filled`` (the largest count over rows, kept by add/reset/load without reading the
device), bounds the slots that can be valid: the exact search scans slots 0..filled-1 only, so its cost
follows what is stored, not the capacity. While every row holds ``filled`` entries (always with one row;
with several until a partial reset or a load of unequal rows; a host-side flag), the search masks no
slot of that prefix. While the rows share their write pointer (the same cases; kept on the host too),
an add writes them with slice copies, not a scatter, and sets the counters without device arithmetic.

Storage grows with what is stored: the buffers hold ``allocated_slots`` slots (``C`` above), 64 at
first (or the capacity, if smaller), and an add that needs more replaces them by buffers of the next
power of two that holds ``filled`` entries, at most the capacity (each token is copied O(1) times
over the memory's life; a 65,536-slot memory is never allocated, nor zeroed, for a short text).
The ring wraps at ``capacity`` as before: slots past ``filled`` are written only once ``filled``
reaches them, so a growing memory is always a filled prefix and growth copies slots 0..filled-1.
A reset that leaves every row empty gives the storage back (the first 64 slots, fresh); one that
leaves entries keeps the allocation. The buffers are registered buffers that growth *replaces*:
read ``mem.keys`` where it is used, never keep a reference to it across an ``add``.

``state_dict()`` holds slots 0..filled-1 only (views of the live buffers), plus ``capacity`` (a 0-d
int64 tensor; a shard's capacity travels in its ``shard`` entry instead), so a saved memory costs
what it stores and equal memories save equal bytes. States saved before (every slot, no ``capacity``
entry: the capacity is their slot count) load as they did.

Every public method checks all of its arguments before it touches any buffer (the data checks of
``add`` unless ``validate=False``), so a failed call leaves the memory exactly as it was.
"""
from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..ops.knn_search import METRICS, knn_search
from ..ops.utils import FLOAT_DTYPES, check_choice, check_finite, check_positive_int, check_tensor
from ..ops.utils.guards import same_device
from . import files
from .index_options import check_index_options
from .names import FAISS_INDEXES, store_names, upgrade_config
from .protocol import MemoryModule, row_mask
from .result import KNNSearchResult
from .sharding import Stripe, assemble, fetch_winners, merge_topk
from .state import SLOT_BUFFERS, STATE_NAMES, check_state, fit_slots


def _locked(method):
    """Run ``method`` holding the memory's lock (see "Threads" in ``KNNMemory``'s docstring)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


def _key_layout(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` ([B, H, C, D]) in the layout searched fastest on its device (a copy only if needed).

    On CPU a [B, H, C, D] view of a dim-major [B, H, D, C] buffer: exact search then scores a query
    with one contiguous matrix-vector product over the slots, 2-3x faster than dot products over
    slot-major rows from 64K slots up (see ``ops/knn_search/naive.py``). GPUs keep slot-major rows, which the fused
    kernels read and gather with unit stride.
    """
    if keys.device.type == "cpu":
        return keys if keys.stride(-2) == 1 else keys.transpose(-1, -2).contiguous().transpose(-1, -2)
    return keys.contiguous()


# Slots a row starts with (or the capacity, if smaller); growth doubles from there.
FIRST_SLOTS = 64


def slots_for(needed: int, capacity: int) -> int:
    """Slots to allocate for ``needed`` entries: the first ``FIRST_SLOTS * 2**i`` that holds them, at
    most ``capacity`` (a function of ``needed`` alone: memories of equal contents allocate alike)."""
    slots = FIRST_SLOTS
    while slots < needed:
        slots *= 2
    return min(slots, capacity)


def _new_keys(B: int, H: int, C: int, D: int, device: torch.device, dtype: torch.dtype, make=torch.zeros) -> torch.Tensor:
    """Keys ``[B, H, C, D]`` (zeros, or uninitialized with ``make=torch.empty``) made in
    ``_key_layout``'s layout at once: zeros laid out slot-major and then copied dim-major wrote the
    buffer three times (SmolLM2's 30 default memories, 65,536 slots each: 7.2 s against 2.6 s for
    keys and values made directly, 1 thread)."""
    if device.type == "cpu":
        return make(B, H, D, C, device=device, dtype=dtype).transpose(-1, -2)
    return make(B, H, C, D, device=device, dtype=dtype)


class KNNMemory(nn.Module, MemoryModule):
    """A kNN memory of past (key, value) pairs, one ring buffer per batch row and kv-head.

    Args:
        batch_size: B, independent memories (one per sequence in the batch).
        heads: H, kv-heads per row; queries may have any multiple of H heads (grouped-query).
        dim: D, key dimension (1..256).
        value_dim: Dv, value dimension (default D).
        capacity: C, slots per row; the oldest entries are evicted first once full.
        index: what is searched: ``"exact"`` (exact top-k over the buffers, ``ml.knn_search``; the
            default) or a FAISS index: ``"flat"``, ``"ivf"`` (IVF-Flat) or ``"hnsw"``.
        metric: ``"ip"``, ``"cosine"`` or ``"l2"`` (scores are higher-is-better; l2 gives ``-||q-k||^2``).
        index_options: the FAISS index's options, checked up front (``memlayers/memory/index_options.py``):
            flat: ``use_gpu``, ``gpus``, ``multi_gpu``; ivf: ``nlist`` (default 64), ``nprobe``
            (default 8), ``train_size`` (vectors a row/head gathers before it trains, searched exactly
            until then; default ``min(max(39 * nlist, 256), capacity)``), ``use_gpu``, ``gpus``,
            ``multi_gpu``; hnsw: ``hnsw_m`` (default 32), ``ef_search`` (default 64, at least k per
            search). ``use_gpu`` defaults to: when faiss has GPUs and the memory is on CUDA. ``gpus``
            (e.g. ``[0, 1]``) spreads each index over those GPUs, ``multi_gpu="shard"`` (faiss
            ``IndexShards``, the default) or ``"replicate"`` (``IndexReplicas``); see
            ``memlayers/memory/faiss_index.py`` and docs/distributed.md.
        backend: the compute backend of the exact search, passed to ``ml.knn_search``: ``"auto"``,
            ``"torch"``, ``"triton"`` or ``"native"``.
        device, dtype: where the buffers live and their dtype (fp32, fp16 or bf16).
        process_group: a ``torch.distributed`` group to shard the memory over (exact index only; see
            ``memlayers/memory/sharding.py``): ``capacity`` stays global, each rank holds every W-th
            slot, and every rank must make the same ``add``/``search``/``reset`` calls with the same
            arguments; each then gets what one unsharded memory returns. ``search(gather=False)`` gives
            global slot ids, which do not index the local buffers. Save each rank's shard to its own
            file; ``KNNMemory.load_shards`` loads them onto any number of ranks.
        validate: ``add`` checks that keys and values are finite and explicit positions non-negative
            (default True: a NaN key would win every later search). These are the store's only read
            of tensor data on the add path, one per add (on a GPU it waits for the device); a caller
            whose inputs are finite by construction may turn them off. ``search`` reads no tensor data with
            ``index="exact"`` whatever ``validate`` says (a non-finite query changes nothing stored;
            with the torch backend it finds nothing); FAISS indexes search on the host.
        search_backend: deprecated spelling of ``backend``; ``backend="exact"|"faiss"`` is the
            deprecated spelling of ``index`` (see ``memlayers/memory/names.py``).

    A memory module (``memlayers.memory.protocol``): its state is its buffers, so it moves with
    ``.to()`` and saves and loads through ``state_dict()``; ``load_state_dict`` accepts the state of
    another batch size or capacity (the buffers are rebuilt to fit), and checks everything it reads
    before it changes anything. ``reset`` (alias ``reset_memory``) forgets chosen rows, ``bind_batch``
    gives the memory a new number of empty rows.

    Threads: one memory may be used from several threads at once. ``add``, ``search``, ``reset``,
    ``bind_batch``, ``save``, ``state_dict`` and ``load_state_dict`` each hold the memory's lock
    (a ``threading.RLock``) for their whole duration, so each sees the others' effects entirely or not
    at all, and FAISS indexes (not thread-safe for writes) are never used by two threads at once.
    Results are fresh tensors. ``state_dict()`` returns views of the live buffers' filled slots, as
    every module returns its buffers: a thread that keeps adding changes them (or, once they grow,
    no longer); ``save`` writes a copy taken under the lock.

    The ``keys`` buffer is ``[B, H, C, D]`` everywhere, but on CPU it is a view of a dim-major
    ``[B, H, D, C]`` buffer (fast exact decode search), so use ``reshape`` rather than ``view`` on it.
    ``C`` is ``allocated_slots``, which grows with what is stored up to the capacity (see the module
    docstring): the buffers are replaced when it does, so read them afresh after an ``add``.

    Example:
        >>> import torch, memlayers as ml
        >>> mem = ml.KNNMemory(batch_size=2, heads=4, dim=64, capacity=1024)
        >>> mem.add(torch.randn(2, 4, 100, 64), torch.randn(2, 4, 100, 64))
        >>> res = mem.search(torch.randn(2, 8, 3, 64), k=16)   # 8 query heads share 4 kv-heads
        >>> res.values.shape
        torch.Size([2, 8, 3, 16, 64])
    """

    def __init__(
        self,
        batch_size: int,
        heads: int,
        dim: int,
        value_dim: Optional[int] = None,
        *,
        capacity: int = 4096,
        index: Optional[str] = None,
        metric: str = "ip",
        index_options: Optional[dict] = None,
        backend: str = "auto",
        device: Optional[Union[torch.device, str]] = None,
        dtype: Optional[torch.dtype] = None,
        validate: bool = True,
        process_group=None,
        search_backend: Optional[str] = None,
    ):
        super().__init__()
        check_positive_int("batch_size", batch_size)
        check_positive_int("heads", heads)
        check_positive_int("dim", dim)
        if dim > 256:
            raise ValueError(f"dim must be in 1..256, got {dim}")
        value_dim = dim if value_dim is None else check_positive_int("value_dim", value_dim)
        check_positive_int("capacity", capacity)
        index, backend = store_names(index, backend, search_backend)
        if not isinstance(validate, bool):
            raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
        check_choice("metric", metric, METRICS)
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
        device = torch.device("cpu") if device is None else torch.device(device)

        self.heads, self.dim, self.value_dim = heads, dim, value_dim
        self.index, self.backend, self.metric, self.validate = index, backend, metric, validate
        self.index_options = check_index_options(index, index_options, capacity)
        if process_group is not None and index != "exact":
            raise ValueError(f"process_group shards the exact index only, got index={index!r}")
        self.process_group = process_group
        self._lock = threading.RLock()
        self._allocate(batch_size, capacity, device, dtype)

    def _allocate(self, batch_size: int, capacity: int, device: torch.device, dtype: torch.dtype,
                  slots: Optional[int] = None) -> None:
        """(Re)build empty buffers (and FAISS indexes) for ``batch_size`` rows of ``capacity`` slots, of
        which ``slots`` are allocated (default: the first ``slots_for(0, ...)``)."""
        B = batch_size
        stripe = None
        if self.process_group is not None:  # checks the capacity against the group's size
            import torch.distributed as dist

            stripe = Stripe(dist.get_rank(self.process_group), dist.get_world_size(self.process_group), capacity)
        C = capacity if stripe is None else stripe.local_capacity  # slots held here
        index_set = None
        if self.index in FAISS_INDEXES:  # built first: bad index_options fail before anything changes
            from .faiss_index import FaissIndexSet

            index_set = FaissIndexSet(B, self.heads, self.dim, C, self.metric, self.index, self.index_options, device)
        self.batch_size, self.capacity, self._stripe = batch_size, capacity, stripe
        keys, values, positions = self._empty_slots(B, slots_for(0, C) if slots is None else slots, device, dtype)
        self.register_buffer("keys", keys)
        self.register_buffer("values", values)
        self.register_buffer("positions", positions)
        self.register_buffer("count", torch.zeros(B, device=device, dtype=torch.long))
        self.register_buffer("write_ptr", torch.zeros(B, device=device, dtype=torch.long))
        self.register_buffer("next_position", torch.zeros(B, device=device, dtype=torch.long))
        self._index = index_set
        self._filled = 0
        self._rows_equal = True  # every row holds `_filled` entries: no slot of the prefix is masked
        self._ptr = 0  # every row's write pointer, while they share one (None: they differ)

    def _empty_slots(self, B: int, slots: int, device: torch.device, dtype: torch.dtype):
        """Empty ``(keys, values, positions)`` buffers of ``slots`` slots per row."""
        return (_new_keys(B, self.heads, slots, self.dim, device, dtype),
                torch.zeros(B, self.heads, slots, self.value_dim, device=device, dtype=dtype),
                torch.full((B, slots), -1, device=device, dtype=torch.long))

    def _local_capacity(self) -> int:
        """The slots this memory's buffers may grow to (a shard's share of the capacity)."""
        return self.capacity if self._stripe is None else self._stripe.local_capacity

    def _local_filled(self) -> int:
        """Local slots 0..n-1 hold every valid entry here (``filled``, or a shard's share of it)."""
        return self._filled if self._stripe is None else self._stripe.local_filled(self._filled)

    def _grow(self, needed: int):
        """Room for ``needed`` local slots: the slot buffers replaced by larger ones holding the filled
        prefix. Returns the buffers replaced (untouched, to put back if the add fails), or None."""
        have = self.keys.shape[2]
        if needed <= have:
            return None
        old = (self.keys, self.values, self.positions)
        B, H, slots, n = self.batch_size, self.heads, slots_for(needed, self._local_capacity()), self._local_filled()
        # Uninitialized, then the prefix copied and only the rest emptied: each byte written once.
        grown = (_new_keys(B, H, slots, self.dim, self.device, self.dtype, make=torch.empty),
                 torch.empty(B, H, slots, self.value_dim, device=self.device, dtype=self.dtype),
                 torch.empty(B, slots, device=self.device, dtype=torch.long))
        for new, buf, (_, axis, empty) in zip(grown, old, SLOT_BUFFERS):
            new.narrow(axis, 0, n).copy_(buf.narrow(axis, 0, n))
            new.narrow(axis, n, slots - n).fill_(empty)
        self.keys, self.values, self.positions = grown
        return old

    # A lock cannot be copied or pickled: a copy of the memory gets a lock of its own.
    def __getstate__(self):
        state = dict(super().__getstate__())
        del state["_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def _apply(self, fn, recurse=True):
        # .to(device) keeps strides: lay the keys out for the new device.
        super()._apply(fn, recurse)
        self.keys = _key_layout(self.keys)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def filled(self) -> int:
        """Slots 0..filled-1 hold every valid entry of every row (the largest count over rows; a host
        int, read without touching the device). 0: the memory holds nothing."""
        return self._filled

    @property
    def memory_batch_size(self) -> int:
        """The batch rows the memory holds (the memory-state protocol's name for ``batch_size``)."""
        return self.batch_size

    def config(self) -> dict:
        """Constructor arguments (JSON-serializable) that rebuild an empty memory of this shape."""
        return {
            "batch_size": self.batch_size, "heads": self.heads, "dim": self.dim, "value_dim": self.value_dim,
            "capacity": self.capacity, "index": self.index, "metric": self.metric,
            "index_options": self.index_options, "backend": self.backend, "validate": self.validate,
            "dtype": str(self.dtype).replace("torch.", ""),
        }

    @property
    def allocated_slots(self) -> int:
        """Slots per row and kv-head the buffers hold now: grows with ``filled`` up to the capacity
        (a shard's share of it), see "Storage grows" in the module docstring."""
        return self.keys.shape[2]

    def nbytes(self) -> int:
        """Bytes the memory holds now: its buffers as allocated (``allocated_slots``, which follows what
        is stored, not the capacity) plus FAISS indexes, when present. What the memory costs, not
        what it could grow to."""
        total = sum(b.numel() * b.element_size() for b in self.buffers())
        if self._index is not None:
            total += self._index.nbytes()
        return total

    def extra_repr(self) -> str:
        shards = "" if self._stripe is None else f", shard={self._stripe.rank} of {self._stripe.world}"
        return (f"batch_size={self.batch_size}, heads={self.heads}, dim={self.dim}, value_dim={self.value_dim}, "
                f"capacity={self.capacity}, index={self.index!r}, metric={self.metric!r}, backend={self.backend!r}{shards}")

    # ------------------------------------------------------------------ validation
    def _check_float(self, name: str, x, shape) -> None:
        check_tensor(name, x, shape=shape, dtypes=(self.dtype,))
        if not same_device(x.device, self.device):
            raise ValueError(f"{name} must be on the memory's device {self.device}, got {x.device}")

    def _check_positions(self, positions, T: int) -> torch.Tensor:
        check_tensor("positions", positions, dtypes=(torch.int32, torch.int64))
        if tuple(positions.shape) == (T,):
            positions = positions.unsqueeze(0).expand(self.batch_size, T)
        elif tuple(positions.shape) != (self.batch_size, T):
            raise ValueError(f"positions must have shape ({T},) or ({self.batch_size}, {T}), got {tuple(positions.shape)}")
        if not same_device(positions.device, self.device):
            raise ValueError(f"positions must be on the memory's device {self.device}, got {positions.device}")
        return positions.long()

    @staticmethod
    def _check_data(keys: torch.Tensor, values: torch.Tensor, positions: Optional[torch.Tensor]) -> None:
        """``validate``'s checks in one device read: explicit positions non-negative, keys and values
        finite. A finite sum proves every element finite (a NaN or an infinity makes the sum NaN or
        infinite), so the elementwise check runs only when the sum is not (a bad input, or finite
        values whose sum overflows): 7 us against 145 us per 512 x 3 x 64 fp32 tensor, 1 thread."""
        flags = [torch.isfinite(keys.sum(dtype=torch.float32) + values.sum(dtype=torch.float32))]
        if positions is not None and positions.numel():
            flags.append(positions.min() >= 0)
        finite, *non_negative = torch.stack(flags).tolist()
        if non_negative and not non_negative[0]:
            raise ValueError("positions must be non-negative")
        if not finite:
            check_finite("keys", keys)
            check_finite("values", values)

    # ------------------------------------------------------------------ writing
    @_locked
    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: Optional[torch.Tensor] = None) -> None:
        """Append T tokens to every row, evicting the oldest slots once the ring is full.

        Args:
            keys: ``[B, H, T, D]``, the memory's dtype and device, finite.
            values: ``[B, H, T, Dv]``, likewise.
            positions: optional ``[B, T]`` or ``[T]`` non-negative ints, the tokens' absolute positions
                (default: each row continues from ``next_position``).

        When T exceeds the capacity only the last C tokens are kept.
        """
        B, H, D, Dv = self.batch_size, self.heads, self.dim, self.value_dim
        self._check_float("keys", keys, (B, H, None, D))
        T = keys.shape[2]
        self._check_float("values", values, (B, H, T, Dv))
        if positions is not None:
            positions = self._check_positions(positions, T)
        if self.validate:  # reads the device: the switch's one cost (see the class docstring)
            self._check_data(keys, values, positions)
        if T == 0:
            return

        if positions is None:
            positions = self.next_position[:, None] + torch.arange(T, device=self.device)
        next_position = positions[:, -1] + 1
        C = self.capacity
        if T > C:  # only the newest C tokens can survive
            keys, values, positions = keys[:, :, -C:], values[:, :, -C:], positions[:, -C:]
            T = C

        if self._stripe is not None:
            self._grow(self._stripe.write_reach(self._filled, T))
            self._write_stripe(keys, values, positions, T)
            self._advance(T, next_position)
            return

        # Every row writes slots below min(filled + T, C): a ring that is not full writes from its count.
        replaced = self._grow(min(self._filled + T, C))
        if self._index is None and self._ptr is not None:
            self._write_run(keys, values, positions, self._ptr, T)
            self._advance(T, next_position)
            return
        slots = (self.write_ptr[:, None] + torch.arange(T, device=self.device)) % C  # [B, T], distinct per row
        key_idx = slots[:, None, :, None].expand(B, H, T, D)
        value_idx = slots[:, None, :, None].expand(B, H, T, Dv)
        # Slots that already held a valid entry are overwritten: an index must forget them.
        was_valid = slots < self.count[:, None]
        if self._index is not None:  # what the write replaces, to undo it if the index fails
            undo = (None if replaced is not None else
                    (self.keys.gather(2, key_idx), self.values.gather(2, value_idx), self.positions.gather(1, slots)),
                    self.count.clone(), self.write_ptr.clone(), self.next_position.clone())
        self.keys.scatter_(2, key_idx, keys)
        self.values.scatter_(2, value_idx, values)
        self.positions.scatter_(1, slots, positions)
        filled, ptr = self._filled, self._ptr
        self._advance(T, next_position)
        if self._index is None:
            return
        try:
            self._index.write(slots, was_valid, self.keys, self.count)
        except BaseException:
            # Never half-written: the buffers go back to what they were, and the indexes (possibly
            # changed in part) are rebuilt from them before the next search.
            written, count, write_ptr, next_pos = undo
            if replaced is not None:  # the buffers before the growth were left untouched
                self.keys, self.values, self.positions = replaced
            else:
                self.keys.scatter_(2, key_idx, written[0])
                self.values.scatter_(2, value_idx, written[1])
                self.positions.scatter_(1, slots, written[2])
            self.count.copy_(count)
            self.write_ptr.copy_(write_ptr)
            self.next_position.copy_(next_pos)
            self._filled, self._ptr = filled, ptr
            self._index.invalidate()
            raise

    def _write_run(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, ptr: int, T: int) -> None:
        """Write the T tokens to slots ``ptr, ptr + 1, ...`` (mod the capacity) of every row, rows that
        share their write pointer: one or two slice copies (a scatter into the dim-major keys costs
        18x a slice copy: 1.17 against 0.064 ms for 512 tokens x 3 heads x 64, 1 thread)."""
        first = min(T, self.capacity - ptr)
        for dst, src, n in ((ptr, 0, first), (0, first, T - first)):
            if n:
                self.keys[:, :, dst:dst + n].copy_(keys[:, :, src:src + n])
                self.values[:, :, dst:dst + n].copy_(values[:, :, src:src + n])
                self.positions[:, dst:dst + n].copy_(positions[:, src:src + n])

    def _advance(self, T: int, next_position: torch.Tensor) -> None:
        """The ring's counters after every row received T tokens (host-side ones included)."""
        C = self.capacity
        if self._rows_equal and self._ptr is not None:  # known on the host: no arithmetic on the device
            self.count.fill_(min(self._filled + T, C))
            self.write_ptr.fill_((self._ptr + T) % C)
        else:
            self.count.copy_(torch.clamp(self.count + T, max=C))
            self.write_ptr.copy_((self.write_ptr + T) % C)
        self.next_position.copy_(next_position)
        self._filled = min(self._filled + T, C)
        if self._ptr is not None:
            self._ptr = (self._ptr + T) % C

    def _write_stripe(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, T: int) -> None:
        """The part of an add that lands in this rank's slots (sharded memories)."""
        local, token, written = self._stripe.writes(self.write_ptr, T)  # [B, J] each

        # A candidate slot that receives no token is rewritten with what it holds.
        B, H, J = self.batch_size, self.heads, local.shape[1]
        for buf, src in ((self.keys, keys), (self.values, values)):
            shape = (B, H, J, buf.shape[3])
            dst, tok, keep = (t[:, None, :, None].expand(shape) for t in (local, token, written))
            buf.scatter_(2, dst, torch.where(keep, src.gather(2, tok), buf.gather(2, dst)))
        old = self.positions.gather(1, local)
        self.positions.scatter_(1, local, torch.where(written, positions.gather(1, token), old))

    @_locked
    @torch.no_grad()
    def reset(self, rows=None) -> None:
        """Empty the chosen rows, e.g. at document boundaries; the others are left exactly as they were.

        Args:
            rows: None (all), an int row id, a sequence or 1-D tensor of row ids, or a ``[B]`` boolean
                mask (tensor or list of bools); read by ``memlayers.memory.protocol.row_mask``.
        """
        mask = row_mask(rows, self.batch_size, self.device)
        self.count[mask] = 0
        self.write_ptr[mask] = 0
        self.next_position[mask] = 0
        # One device read per partial reset (not per search): the rows left decide the filled prefix.
        if rows is None:
            self._filled, self._rows_equal, self._ptr = 0, True, 0
        else:
            self._track_counts()
        if self._filled == 0:  # nothing held: the first slots only, fresh (the storage is given back)
            slots = slots_for(0, self._local_capacity())
            self.keys, self.values, self.positions = self._empty_slots(self.batch_size, slots, self.device, self.dtype)
        else:
            self.keys[mask] = 0
            self.values[mask] = 0
            self.positions[mask] = -1
        if self._index is not None:
            self._index.reset_rows(mask.nonzero().flatten().tolist())

    def _track_counts(self) -> None:
        """``filled``, whether every row holds that many, and whether the rows share their write
        pointer, from ``count`` and ``write_ptr`` (one device read: after a partial reset or a load,
        never per search or add)."""
        lo, hi, first, last = torch.stack([*torch.aminmax(self.count), *torch.aminmax(self.write_ptr)]).tolist()
        self._filled, self._rows_equal, self._ptr = hi, lo == hi, (first if first == last else None)

    def reset_memory(self, rows=None) -> None:
        """The memory-state protocol's name for ``reset``."""
        self.reset(rows)

    @_locked
    def bind_batch(self, batch_size: int) -> None:
        """Give the memory ``batch_size`` empty rows (what it held is dropped), on its device and dtype."""
        check_positive_int("batch_size", batch_size)
        self._allocate(batch_size, self.capacity, self.device, self.dtype)

    # ------------------------------------------------------------------ reading
    @_locked
    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, gather: bool = True) -> KNNSearchResult:
        """Retrieve the top-k memories of every query from its own row and kv-head.

        Args:
            queries: ``[B, Hq, T, D]``, the memory's dtype and device; ``Hq`` a multiple of ``H``
                (query head ``h`` searches kv-head ``h // (Hq // H)``).
            k: memories per query (results beyond the stored count are marked missing).
            gather: also return the gathered ``keys [B, Hq, T, k, D]`` and ``values [B, Hq, T, k, Dv]``;
                a fused consumer (``ml.ops.memory_attention``) passes False and gathers by index itself.

        Returns:
            ``KNNSearchResult`` with ``scores``, ``indices``, ``positions``, ``mask`` (``[B, Hq, T, k]``)
            and, with ``gather``, ``keys`` and ``values``.
        """
        B, H, D = self.batch_size, self.heads, self.dim
        self._check_float("queries", queries, (B, None, None, D))
        Hq, T = queries.shape[1], queries.shape[2]
        if Hq % H != 0:
            raise ValueError(f"queries' head count ({Hq}) must be a multiple of the memory's heads ({H})")
        check_positive_int("k", k)

        if self._stripe is not None:
            return self._search_sharded(queries, k, gather)
        if self._index is not None:
            scores, indices = self._index.search(queries, k, self.keys, self.count)
        elif self._filled == 0:
            scores = torch.full((B, Hq, T, k), float("-inf"), device=self.device)
            indices = torch.full((B, Hq, T, k), -1, dtype=torch.long, device=self.device)
        else:  # only slots 0..filled-1 can be valid: the cost follows what is stored, not the capacity
            lengths = None if self._rows_equal else self.count
            scores, indices = knn_search(queries, self.keys[:, :, : self._filled], k, valid_lengths=lengths,
                                         metric=self.metric, backend=self.backend)
        mask = indices >= 0
        safe = indices.clamp_min(0)
        positions = self.positions.gather(1, safe.reshape(B, -1)).reshape(B, Hq, T, k).masked_fill(~mask, -1)
        result = KNNSearchResult(scores=scores, indices=indices, positions=positions, mask=mask)
        if gather:
            result.keys = self._gather(self.keys, safe, mask)
            result.values = self._gather(self.values, safe, mask)
        return result

    def _search_sharded(self, queries: torch.Tensor, k: int, gather: bool) -> KNNSearchResult:
        B, Hq, T = queries.shape[:3]
        stripe, group = self._stripe, self.process_group
        filled = stripe.local_filled(self._filled)
        if filled == 0:
            scores = torch.full((B, Hq, T, k), float("-inf"), device=self.device)
            local = torch.full((B, Hq, T, k), -1, dtype=torch.long, device=self.device)
        else:
            scores, local = knn_search(queries, self.keys[:, :, :filled], k, valid_lengths=stripe.local_count(self.count),
                                       metric=self.metric, backend=self.backend)
        scores, indices = merge_topk(scores, stripe.global_slots(local), k, group)
        mask = indices >= 0
        owner = torch.where(mask, indices % stripe.world, torch.full_like(indices, -1))
        safe = torch.where(owner == stripe.rank, indices // stripe.world, torch.zeros_like(indices))
        # One row of bytes per winner: position, then key and value (with gather) in the memory's dtype.
        parts = [self.positions.gather(1, safe.reshape(B, -1)).reshape(-1, 1)]
        if gather:
            parts += [self._gather(buf, safe, mask).reshape(parts[0].shape[0], -1) for buf in (self.keys, self.values)]
        widths = [p.shape[1] * p.element_size() for p in parts]
        rows = fetch_winners(torch.cat([p.view(torch.uint8) for p in parts], dim=1), owner.reshape(-1), group)
        fetched = [r.contiguous().view(p.dtype) for r, p in zip(rows.split(widths, dim=1), parts)]
        positions = fetched[0].reshape(B, Hq, T, k).masked_fill(~mask, -1)
        result = KNNSearchResult(scores=scores, indices=indices, positions=positions, mask=mask)
        if gather:
            result.keys = fetched[1].reshape(B, Hq, T, k, self.dim)
            result.values = fetched[2].reshape(B, Hq, T, k, self.value_dim)
        return result

    def _gather(self, buf: torch.Tensor, safe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Query head hq = h * G + g reads kv-head h: fold (G, T, k) into one index axis per kv-head.
        B, Hq, T, k = safe.shape
        H, E = buf.shape[1], buf.shape[3]
        idx = safe.reshape(B, H, -1, 1).expand(-1, -1, -1, E)
        out = buf.gather(2, idx).reshape(B, Hq, T, k, E)
        return out.masked_fill(~mask[..., None], 0)

    # ------------------------------------------------------------------ persistence
    # FAISS indexes travel in the state dict as uint8 tensors ("faiss.<row>.<head>", "faiss.stale"), so
    # that a memory inside a model saves with safetensors like any other weight.
    @_locked
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        n = self._local_filled()  # the slots past it hold nothing (see the module docstring)
        for name, axis, _ in SLOT_BUFFERS:
            destination[prefix + name] = destination[prefix + name].narrow(axis, 0, n)
        if self._stripe is None:
            destination[prefix + "capacity"] = torch.tensor(self.capacity)
        if self._index is not None:
            for key, blob in self._index.serialize().items():
                destination[f"{prefix}faiss.{key}"] = blob
        if self._stripe is not None:  # which share of the slots this shard holds
            st = self._stripe
            destination[f"{prefix}shard"] = torch.tensor([st.rank, st.world, st.capacity])

    @_locked
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Everything is checked before anything changes: on a problem the memory is left as it was.
        tag = f"{prefix}faiss."
        blobs = {k[len(tag):]: v for k, v in state_dict.items() if k.startswith(tag)}
        tags = (prefix + "shard", prefix + "capacity")
        rest = {k: v for k, v in state_dict.items() if not k.startswith(tag) and k not in tags}
        shard, capacity = (state_dict.get(k) for k in tags)
        state = {name: rest[prefix + name] for name in STATE_NAMES if prefix + name in rest}
        if not state:  # nothing of this memory in the state dict: the base class reports missing keys
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
            return
        try:
            B, C, state = self._check_loaded(state, shard, capacity)
            check_index_options(self.index, self.index_options, C)  # e.g. an IVF train_size above C
            parsed = None
            if self._index is not None and blobs:
                from .faiss_index import FaissIndexSet

                target = FaissIndexSet(B, self.heads, self.dim, C, self.metric, self.index, self.index_options, self.device)
                parsed = target.parse(blobs, state["keys"].to(self.dtype), state["count"])
        except ValueError as e:
            error_msgs.append(f"KNNMemory {prefix.rstrip('.') or '(root)'}: {e}")
            return
        # The slots the loaded entries need, allocated as growth would have (the state may hold more,
        # all empty: a state saved before holds every slot of the capacity).
        stripe = None if self._stripe is None else Stripe(self._stripe.rank, self._stripe.world, C)
        held = int(state["count"].max())
        needed = held if stripe is None else stripe.local_filled(held)
        slots = slots_for(needed, C if stripe is None else stripe.local_capacity)
        state = fit_slots(state, slots)
        if (B, C) != (self.batch_size, self.capacity):
            self._allocate(B, C, self.device, self.dtype, slots)
        elif slots != self.allocated_slots:
            self.keys, self.values, self.positions = self._empty_slots(B, slots, self.device, self.dtype)
        rest.update({prefix + name: t for name, t in state.items()})
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self.keys = _key_layout(self.keys)  # load_state_dict(assign=True) takes the given tensor's strides
        self._track_counts()
        if blobs and self._index is None and strict:
            unexpected_keys.extend(tag + k for k in blobs)
        if self._index is not None:
            if parsed is not None:
                self._index.adopt(*parsed)
            else:
                self._index.rebuild(self.keys, self.count)

    def _check_loaded(self, state: dict, shard: Optional[torch.Tensor], capacity: Optional[torch.Tensor]):
        """``(batch_size, capacity, state for this memory's buffers)``, or a ``ValueError``.

        A sharded memory takes its own shard (same rank, group size and capacity), or its stripe of an
        unsharded state; an unsharded memory takes unsharded states only. ``capacity``: the state's
        ``capacity`` entry (None in states saved before it: their slot count is the capacity)."""
        if shard is None:
            B, C = check_state(state, self.heads, self.dim, self.value_dim, capacity=capacity)
            if self._stripe is not None:
                state = Stripe(self._stripe.rank, self._stripe.world, C).take(state)
            return B, C, state
        if not isinstance(shard, torch.Tensor) or tuple(shard.shape) != (3,):
            raise ValueError(f"shard must be a tensor [rank, world size, capacity], got {shard!r}")
        rank, world, shared = (int(v) for v in shard.tolist())
        mine = self._stripe
        if mine is None or (rank, world) != (mine.rank, mine.world):
            where = "an unsharded memory" if mine is None else f"rank {mine.rank} of {mine.world}"
            raise ValueError(f"the state is rank {rank}'s shard of a memory sharded over {world} ranks, and cannot "
                             f"load into {where} alone: load every shard's file with KNNMemory.load_shards")
        B, C = check_state(state, self.heads, self.dim, self.value_dim, Stripe(rank, world, shared), capacity)
        return B, C, state

    @classmethod
    def load_shards(cls, paths, process_group=None, device=None) -> "KNNMemory":
        """Load the files a sharded memory saved (one per rank, any order) onto ``process_group``'s
        ranks, whatever their number (None: one unsharded memory). Every rank reads every file."""
        shards, configs = [], []
        for path in paths:
            tensors, config, _ = files.read(path)
            shard = tensors.pop("shard", None)
            if shard is None or tuple(shard.shape) != (3,):
                raise ValueError(f"{path} is not a shard of a sharded KNNMemory (no shard entry)")
            stripe = Stripe(*(int(v) for v in shard.tolist()))
            try:
                check_state(tensors, config["heads"], config["dim"], config["value_dim"], stripe)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path} does not hold a loadable KNNMemory shard ({e})") from None
            shards.append((stripe, tensors))
            configs.append(upgrade_config(config))
        if not shards:
            raise ValueError("paths must name at least one shard file")
        world = shards[0][0].world
        if sorted(st.rank for st, _ in shards) != list(range(world)) or any(st.world != world for st, _ in shards):
            raise ValueError(f"paths must name each rank's shard once; got ranks "
                             f"{[(st.rank, st.world) for st, _ in shards]} (rank, group size)")
        same = ("count", "write_ptr", "next_position")
        if any(c != configs[0] for c in configs) or any(not torch.equal(t[n], shards[0][1][n]) for _, t in shards for n in same):
            raise ValueError("the shard files come from different memories (configurations or ring pointers differ)")
        config = configs[0]
        config["dtype"] = getattr(torch, config["dtype"])
        mem = cls(**config, process_group=process_group, device=device)
        mem.load_state_dict(assemble(sorted(shards, key=lambda s: s[0].rank)))
        return mem

    def save(self, path: Union[str, Path]) -> None:
        """Write the memory (buffers, configuration, FAISS indexes) to a safetensors file, atomically.

        The same memory always gives the same bytes; a SHA-256 of the tensors travels in the file and
        ``load`` checks it. See ``memlayers/memory/files.py`` for the format and the temporary file.
        A sharded memory writes this rank's shard: give each rank a path of its own, and load them
        together with ``KNNMemory.load_shards``.
        """
        with self._lock:
            tensors = {name: t.detach().cpu().clone() for name, t in self.state_dict().items()}
            config = self.config()
        files.write(path, tensors, config)

    @classmethod
    def load(cls, path: Union[str, Path], device: Optional[Union[torch.device, str]] = None) -> "KNNMemory":
        """Rebuild a memory saved with ``save``: same contents, pointers, positions and FAISS indexes.

        Raises ``ValueError`` naming the file and what is wrong when it is damaged, not a KNNMemory
        file, or holds an inconsistent state (``FileNotFoundError`` when it does not exist).
        """
        tensors, config, _ = files.read(path)
        try:
            config = upgrade_config(config)
            config["dtype"] = getattr(torch, config["dtype"])
            mem = cls(**config, device=device)
            mem.load_state_dict(tensors)
        except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{path} does not hold a loadable KNNMemory ({type(e).__name__}: {e})") from None
        return mem
