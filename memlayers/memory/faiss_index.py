"""FAISS indexes behind ``KNNMemory(index="flat"|"ivf"|"hnsw")``: one index per (batch row, kv-head).

Slot ids stay in step with the ring buffer in one of two ways:
- *incremental* (CPU Flat and IVF-Flat): each vector is added with its slot id, and an overwritten
  slot is removed (``remove_ids``) before its new vector is added;
- *rebuild* (HNSW, which cannot remove, and GPU indexes): vectors are added in slot order, so FAISS's
  sequential ids are the slot ids; once a write evicts anything the index is marked stale and rebuilt
  from the buffer, in slot order, before the next search.

Several GPUs (``index_options["gpus"]``, two or more) hold one index through faiss's own composite
indexes, built from one GPU index per device (``index_cpu_to_gpu``): ``multi_gpu="shard"`` an
``IndexShards`` (each GPU holds part of the vectors; every query goes to all, results merged), or
``"replicate"`` an ``IndexReplicas`` (each GPU holds every vector and searches a part of the queries).
Both follow the rebuild scheme: neither composite removes ids. ``IndexShards`` with sequential ids
accepts a single add pass, so its parts take explicit slot ids (``add_with_ids``; a flat part wrapped
in ``IndexIDMap``) and appends need no rebuild; ``IndexReplicas`` adds in slot order to every
replica. An eviction costs a rebuild of the (row, head) from the buffer, as on one GPU. faiss cannot
serialize the composites: their state dict has no FAISS entries, and a loaded or copied memory rebuilds
them from its buffer (IVF retrains, deterministically) before its first search.

IVF indexes train (deterministically: FAISS seeds its k-means) once a row/head holds ``train_size``
vectors; until then that row/head is searched exactly. faiss is imported here only.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

_HNSW_SEED = 12345


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("KNNMemory(index='flat'|'ivf'|'hnsw') needs faiss: pip install memlayers[faiss]") from e
    return faiss


def _gpu_count(faiss) -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class FaissIndexSet:
    """B x H FAISS indexes mirroring a KNNMemory's key buffer (see the module docstring)."""

    def __init__(self, batch_size: int, heads: int, dim: int, capacity: int, metric: str, index_type: str,
                 options: dict, device: torch.device):
        faiss = _faiss()
        # options: complete and checked by index_options.check_index_options.
        self.B, self.H, self.D, self.C = batch_size, heads, dim, capacity
        self.metric, self.index_type = metric, index_type
        self.nlist, self.nprobe, self.train_size = options.get("nlist"), options.get("nprobe"), options.get("train_size")
        self.hnsw_m, self.ef_search = options.get("hnsw_m"), options.get("ef_search")
        use_gpu = options.get("use_gpu") if index_type != "hnsw" else False  # faiss has no GPU HNSW
        gpus = options.get("gpus")
        if gpus is not None:  # checked in index_options: distinct ids, use_gpu not False
            if _gpu_count(faiss) < len(gpus) or max(gpus) >= _gpu_count(faiss):
                raise ValueError(f"index_options['gpus'] is {gpus} but this faiss build sees "
                                 f"{_gpu_count(faiss)} GPU(s)")
            use_gpu = True
        if use_gpu is None:
            use_gpu = device.type == "cuda" and _gpu_count(faiss) > 0
        if use_gpu and _gpu_count(faiss) == 0:
            raise ValueError("index_options['use_gpu'] is True but this faiss build has no GPU support")
        self.use_gpu = bool(use_gpu)
        self.gpus = list(gpus) if gpus is not None else [(device.index or 0) if device.type == "cuda" else 0]
        self.split = options.get("multi_gpu") if len(self.gpus) > 1 else None  # None: one index, one device
        self._gpu_resources = [faiss.StandardGpuResources() for _ in self.gpus] if self.use_gpu else None
        self.incremental = index_type in ("flat", "ivf") and not self.use_gpu
        self.explicit_ids = self.incremental or self.split == "shard"  # ids passed to add_with_ids
        self._faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.indexes = [[self._new_index() for _ in range(heads)] for _ in range(batch_size)]
        self.stale = np.zeros((batch_size, heads), dtype=bool)

    # ------------------------------------------------------------------ construction
    def _new_cpu_index(self):
        faiss = _faiss()
        if self.index_type == "flat":
            base = faiss.IndexFlatL2(self.D) if self.metric == "l2" else faiss.IndexFlatIP(self.D)
            return faiss.IndexIDMap(base) if self.incremental else base
        if self.index_type == "ivf":
            quantizer = faiss.IndexFlatL2(self.D) if self.metric == "l2" else faiss.IndexFlatIP(self.D)
            index = faiss.IndexIVFFlat(quantizer, self.D, self.nlist, self._faiss_metric)
            index.nprobe = self.nprobe
            return index
        index = faiss.IndexHNSWFlat(self.D, self.hnsw_m, self._faiss_metric)
        index.hnsw.efSearch = self.ef_search
        return index

    def _to_gpu(self, part: int, cpu_index):
        return _faiss().index_cpu_to_gpu(self._gpu_resources[part], self.gpus[part], cpu_index)

    def _to_device(self, cpu_index):
        if not self.use_gpu:
            return cpu_index
        return self._to_gpu(0, cpu_index)

    def _new_index(self):
        if self.split is None:
            return self._to_device(self._new_cpu_index())
        faiss = _faiss()
        parts = [self._to_gpu(i, self._new_cpu_index()) for i in range(len(self.gpus))]
        if self.split == "shard":
            if self.index_type == "flat":  # a GPU flat index takes no ids of its own
                parts = [faiss.IndexIDMap(p) for p in parts]
            index = faiss.IndexShards(self.D, True, False)  # threaded, explicit ids
            for p in parts:
                index.add_shard(p)
        else:
            index = faiss.IndexReplicas(self.D, True)
            for p in parts:
                index.addIndex(p)  # (faiss's Python layer keeps the parts of add_shard/addIndex alive)
        return index

    def _vectors(self, x: torch.Tensor) -> np.ndarray:
        v = np.ascontiguousarray(x.detach().float().cpu().numpy())
        if self.metric == "cosine":
            _faiss().normalize_L2(v)
        return v

    # ------------------------------------------------------------------ keeping in step
    def _needs_training(self, index) -> bool:
        if self.split is None:
            return not index.is_trained
        # A composite's own is_trained is cleared by reset(); its parts keep their training.
        return not all(index.at(i).is_trained for i in range(index.count()))

    def invalidate(self) -> None:
        """Mark every index stale (rebuilt from the buffer before its next search): a write that failed
        half-way may have left an index out of step with the buffer."""
        self.stale[:] = True

    def _add(self, index, vecs: np.ndarray, ids: np.ndarray = None) -> None:
        if self.index_type == "hnsw":
            # HNSW draws node levels from an RNG that serialization does not keep: seeding it from the
            # index size makes the graph a function of the data alone, so a saved-and-loaded index
            # (or a rebuilt one) stays identical to the original as both keep growing.
            index.hnsw.rng = _faiss().RandomGenerator(_HNSW_SEED + index.ntotal)
        if ids is None:
            index.add(vecs)
        else:
            index.add_with_ids(vecs, ids)

    def _fill(self, b: int, h: int, keys_buf: torch.Tensor, count: int) -> None:
        """(Re)build index (b, h) from the buffer's valid slots 0..count-1, training IVF if due."""
        index = self.indexes[b][h]
        index.reset()
        self.stale[b, h] = False
        if count == 0:
            return
        vecs = self._vectors(keys_buf[b, h, :count])
        if self._needs_training(index):
            if count < self.train_size:
                return  # searched exactly until enough vectors arrive
            index.train(vecs)
        self._add(index, vecs, np.arange(count, dtype=np.int64) if self.explicit_ids else None)

    def write(self, slots: torch.Tensor, was_valid: torch.Tensor, keys_buf: torch.Tensor, count: torch.Tensor) -> None:
        """Mirror a write that already landed in the buffer.

        Args:
            slots: ``[B, T]`` slot ids just written.
            was_valid: ``[B, T]`` True where the slot held an entry that was evicted.
            keys_buf: ``[B, H, C, D]`` the memory's key buffer after the write.
            count: ``[B]`` valid slots after the write.
        """
        slots_np = slots.cpu().numpy().astype(np.int64)
        evicted_np = was_valid.cpu().numpy()
        counts = count.cpu().tolist()
        for b in range(self.B):
            evicted = slots_np[b][evicted_np[b]]
            for h in range(self.H):
                index = self.indexes[b][h]
                if self._needs_training(index):
                    if counts[b] >= self.train_size:
                        self._fill(b, h, keys_buf, counts[b])
                    continue
                if not self.incremental:
                    if evicted.size or index.ntotal + slots_np.shape[1] != counts[b]:
                        self.stale[b, h] = True
                    elif not self.stale[b, h]:  # an append: the slots written are the next ids in order
                        self._add(index, self._vectors(keys_buf[b, h, torch.as_tensor(slots_np[b])]),
                                  slots_np[b] if self.explicit_ids else None)
                    continue
                if evicted.size:
                    index.remove_ids(evicted)
                self._add(index, self._vectors(keys_buf[b, h, torch.as_tensor(slots_np[b])]), slots_np[b])

    def reset_rows(self, rows: List[int]) -> None:
        for b in rows:
            for h in range(self.H):
                # Keep IVF training: the coarse quantizer still describes the key distribution.
                self.indexes[b][h].reset()
                self.stale[b, h] = False

    # ------------------------------------------------------------------ searching
    def _search_params(self, k: int):
        # HNSW returns fewer than k results when its queue (efSearch) is shorter than k.
        if self.index_type == "hnsw":
            return _faiss().SearchParametersHNSW(efSearch=max(self.ef_search, k))
        return None

    def search(self, queries: torch.Tensor, k: int, keys_buf: torch.Tensor, count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """queries ``[B, Hq, T, D]`` -> (scores ``[B, Hq, T, k]`` fp32, slot indices ``[B, Hq, T, k]`` int64)."""
        from ..ops.knn_search import knn_search_naive

        B, Hq, T, D = queries.shape
        G = Hq // self.H
        counts = count.cpu().tolist()
        scores = np.full((B, self.H, G * T, k), -np.inf, dtype=np.float32)
        labels = np.full((B, self.H, G * T, k), -1, dtype=np.int64)
        q_all = queries.reshape(B, self.H, G * T, D)
        for b in range(B):
            for h in range(self.H):
                index = self.indexes[b][h]
                if self.stale[b, h]:
                    self._fill(b, h, keys_buf, counts[b])
                if counts[b] == 0:
                    continue
                if self._needs_training(index):  # IVF still gathering its training set: exact search
                    # Slots 0..count-1 hold the row's keys until it has trained: scan those only.
                    s, i = knn_search_naive(q_all[b : b + 1, h : h + 1], keys_buf[b : b + 1, h : h + 1, : counts[b]], k,
                                            metric=self.metric)
                    scores[b, h], labels[b, h] = s[0, 0].cpu().numpy(), i[0, 0].cpu().numpy()
                    continue
                dist, ids = index.search(self._vectors(q_all[b, h]), k, params=self._search_params(k))
                scores[b, h] = -dist if self.metric == "l2" else dist
                labels[b, h] = ids
        scores[labels < 0] = -np.inf
        out_s = torch.from_numpy(scores).reshape(B, Hq, T, k).to(queries.device)
        out_i = torch.from_numpy(labels).reshape(B, Hq, T, k).to(queries.device)
        return out_s, out_i

    # ------------------------------------------------------------------ persistence
    def _cpu(self, index):
        return _faiss().index_gpu_to_cpu(index) if self.use_gpu else index

    def serialize(self) -> Dict[str, torch.Tensor]:
        """``{"<row>.<head>": uint8 tensor}``: every index as FAISS serializes it (stale ones as stale);
        nothing for indexes over several GPUs, which faiss cannot serialize (rebuilt on load)."""
        faiss = _faiss()
        if self.split is not None:
            return {}
        out = {}
        for b in range(self.B):
            for h in range(self.H):
                blob = faiss.serialize_index(self._cpu(self.indexes[b][h]))
                out[f"{b}.{h}"] = torch.from_numpy(np.array(blob, dtype=np.uint8, copy=True))
        out["stale"] = torch.from_numpy(self.stale.astype(np.uint8))
        return out

    def _stored(self, index) -> Tuple[np.ndarray, np.ndarray]:
        """``(slot ids, vectors)`` an index holds, read back from its storage."""
        faiss = _faiss()
        n = index.ntotal
        if isinstance(index, faiss.IndexIDMap):
            return faiss.vector_to_array(index.id_map), faiss.downcast_index(index.index).reconstruct_n(0, n)
        if isinstance(index, faiss.IndexIVF):
            lists = index.invlists
            ids, vecs = [], []
            for l in range(lists.nlist):
                size = lists.list_size(l)
                if size:
                    ids.append(faiss.rev_swig_ptr(lists.get_ids(l), size).copy())
                    codes = faiss.rev_swig_ptr(lists.get_codes(l), size * index.code_size).copy()
                    vecs.append(codes.view(np.float32).reshape(size, self.D))
            if not ids:
                return np.zeros(0, np.int64), np.zeros((0, self.D), np.float32)
            return np.concatenate(ids), np.concatenate(vecs)
        return np.arange(n, dtype=np.int64), index.reconstruct_n(0, n)  # sequential ids are slot ids

    def _check_owner(self, index, name: str, keys: torch.Tensor) -> None:
        """The index holds exactly these keys (``[count, D]``, slots 0..count-1) under their slot ids,
        or nothing while it is untrained: not another row's, head's or memory's index."""
        count = 0 if not index.is_trained else keys.shape[0]
        if index.ntotal != count:
            raise ValueError(f"{name} holds {index.ntotal} vectors where its row holds {count}")
        ids, vecs = self._stored(index)
        order = np.argsort(ids, kind="stable")
        if not np.array_equal(ids[order], np.arange(count)) or not np.array_equal(vecs[order], self._vectors(keys[:count])):
            raise ValueError(f"{name} holds other vectors than its row and head of the key buffer")

    def parse(self, blobs: Dict[str, torch.Tensor], keys_buf: torch.Tensor,
              count: torch.Tensor) -> Optional[Tuple[list, np.ndarray]]:
        """Read ``serialize``'s output for the key buffer ``keys_buf`` ([B, H, C, D]) with ``count``
        ([B]) valid slots, without adopting it.

        Returns ``(indexes, stale)`` for ``adopt``, or None for indexes over several GPUs, which are
        rebuilt from the buffer whatever the entries hold. Raises ``ValueError`` naming the entry when one is
        missing, cannot be read, or describes another configuration (dimension, metric, index kind)
        or holds other vectors than its row and head of the buffer.
        """
        if self.split is not None:
            return None
        faiss = _faiss()
        wanted = {f"{b}.{h}" for b in range(self.B) for h in range(self.H)} | {"stale"}
        if set(blobs) != wanted:
            missing = ["faiss." + k for k in sorted(wanted - set(blobs))]
            extra = ["faiss." + k for k in sorted(set(blobs) - wanted)]
            raise ValueError(f"the FAISS entries do not match {self.B} rows x {self.H} heads "
                             f"(missing {missing[:4]}, unexpected {extra[:4]})")
        stale = blobs["stale"]
        if tuple(stale.shape) != (self.B, self.H) or stale.dtype != torch.uint8:
            raise ValueError(f"faiss.stale has shape {tuple(stale.shape)} and dtype {stale.dtype}, "
                             f"expected ({self.B}, {self.H}) uint8")
        stale = stale.cpu().numpy().astype(bool)
        counts = count.cpu().tolist()
        kind = type(self._new_cpu_index())
        indexes = []
        for b in range(self.B):
            row = []
            for h in range(self.H):
                blob = blobs[f"{b}.{h}"]
                if blob.dtype != torch.uint8 or blob.dim() != 1:
                    raise ValueError(f"faiss.{b}.{h} must be a 1-D uint8 tensor, got {blob.dtype} {tuple(blob.shape)}")
                try:
                    index = faiss.deserialize_index(blob.cpu().numpy())
                except RuntimeError as e:
                    raise ValueError(f"faiss.{b}.{h} is not a readable FAISS index ({str(e).splitlines()[0]})") from None
                if type(index) is not kind or index.d != self.D or index.metric_type != self._faiss_metric:
                    raise ValueError(f"faiss.{b}.{h} is a {type(index).__name__} of dimension {index.d}, metric "
                                     f"{index.metric_type}; this memory needs a {kind.__name__} of dimension "
                                     f"{self.D}, metric {self._faiss_metric}")
                if not stale[b, h]:
                    self._check_owner(index, f"faiss.{b}.{h}", keys_buf[b, h, : counts[b]])
                row.append(index)
            indexes.append(row)
        return indexes, stale

    def adopt(self, indexes: list, stale: np.ndarray) -> None:
        """Use what ``parse`` read."""
        self.indexes = [[self._to_device(index) for index in row] for row in indexes]
        self.stale = stale

    def rebuild(self, keys_buf: torch.Tensor, count: torch.Tensor) -> None:
        """Rebuild every index from the buffer (a state dict without FAISS entries)."""
        counts = count.cpu().tolist()
        for b in range(self.B):
            for h in range(self.H):
                self._fill(b, h, keys_buf, counts[b])

    # Copies (copy.deepcopy of a model, pickling): FAISS's SWIG objects travel as their serialized bytes.
    # Composites over several GPUs travel as nothing and are rebuilt from the buffer (marked stale).
    def __getstate__(self):
        state = dict(self.__dict__)
        if self.split is None:
            state["indexes"] = [[_faiss().serialize_index(self._cpu(i)) for i in row] for row in self.indexes]
        else:
            state["indexes"], state["stale"] = None, np.ones_like(self.stale)
        state["_gpu_resources"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.use_gpu:
            self._gpu_resources = [_faiss().StandardGpuResources() for _ in self.gpus]
        if self.indexes is None:
            self.indexes = [[self._new_index() for _ in range(self.H)] for _ in range(self.B)]
        else:
            self.indexes = [[self._to_device(_faiss().deserialize_index(blob)) for blob in row] for row in self.indexes]

    def nbytes(self) -> int:
        total = 0
        for row in self.indexes:
            for index in row:
                # Stored vectors dominate: ntotal x D fp32 (graph / list overheads not counted), once
                # per replica.
                total += index.ntotal * self.D * 4 * (len(self.gpus) if self.split == "replicate" else 1)
        return total
