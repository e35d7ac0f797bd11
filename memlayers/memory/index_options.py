"""``index_options`` of a FAISS-backed ``KNNMemory``: checked and completed before anything is built.

FAISS aborts the process on some bad parameters (``hnsw_m=0``) and fails late on others (an IVF index
asked to train on fewer vectors than it has lists fails inside ``add``), so every option is checked
here, against the index it applies to and the memory's capacity, up front.
"""
from __future__ import annotations

from typing import Optional

_DEFAULTS = {
    "flat": {"use_gpu": None, "gpus": None, "multi_gpu": "shard"},
    "ivf": {"nlist": 64, "nprobe": 8, "train_size": None, "use_gpu": None, "gpus": None, "multi_gpu": "shard"},
    "hnsw": {"hnsw_m": 32, "ef_search": 64},
}


def _int_at_least(name: str, value, minimum: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"index_options['{name}'] must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"index_options['{name}'] must be >= {minimum} ({why}), got {value}")
    return value


def check_index_options(index: str, options: Optional[dict], capacity: int) -> dict:
    """The complete options of ``index`` (defaults filled in), or a ``ValueError``/``TypeError`` naming
    the option.

    Options by index:
        flat: ``use_gpu`` (None: when faiss has GPUs and the memory is on CUDA), ``gpus`` (None, or the
            distinct GPU ids each index lives on; implies ``use_gpu``; whether faiss has them is checked
            when the index is built) and ``multi_gpu`` (``"shard"``, the default: each of several GPUs
            holds a part of the vectors, faiss ``IndexShards``; ``"replicate"``: each holds them all and
            takes a part of the queries, faiss ``IndexReplicas``).
        ivf: ``nlist`` (>= 1, default 64), ``nprobe`` (>= 1, default 8; FAISS probes at most nlist),
            ``train_size`` (nlist..capacity, default ``min(max(39 * nlist, 256), capacity)``: vectors a
            row/head gathers before its index trains; searched exactly until then), ``use_gpu``,
            ``gpus``, ``multi_gpu``.
        hnsw: ``hnsw_m`` (>= 2, default 32), ``ef_search`` (>= 1, default 64; each search uses at least
            k, as FAISS needs to return k results).
    ``index="exact"`` takes no options.
    """
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise TypeError(f"index_options must be a dict or None, got {type(options).__name__}")
    if index == "exact":
        if options:
            raise ValueError(f"index_options apply to FAISS indexes ('flat', 'ivf', 'hnsw'); index='exact' "
                             f"takes none, got {sorted(options)}")
        return {}
    known = _DEFAULTS[index]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"index_options has keys {unknown} that index={index!r} does not take; it takes {sorted(known)}")
    out = {**known, **options}
    if index == "ivf":
        _int_at_least("nlist", out["nlist"], 1, "IVF needs at least one list")
        _int_at_least("nprobe", out["nprobe"], 1, "a search probes at least one list")
        if out["train_size"] is None:
            out["train_size"] = min(max(39 * out["nlist"], 256), capacity)
        _int_at_least("train_size", out["train_size"], out["nlist"], "k-means needs a vector per list")
        if out["train_size"] > capacity:
            raise ValueError(f"index_options['train_size'] ({out['train_size']}) exceeds the capacity ({capacity}): "
                             f"the index would never train")
        if out["nlist"] > capacity:
            raise ValueError(f"index_options['nlist'] ({out['nlist']}) exceeds the capacity ({capacity})")
    if index == "hnsw":
        _int_at_least("hnsw_m", out["hnsw_m"], 2, "an HNSW graph needs at least 2 links per node")
        _int_at_least("ef_search", out["ef_search"], 1, "the search queue holds at least one candidate")
    if out.get("use_gpu") is not None and not isinstance(out["use_gpu"], bool):
        raise TypeError(f"index_options['use_gpu'] must be a bool or None, got {type(out['use_gpu']).__name__}")
    if "gpus" in out:
        out["gpus"] = _gpu_list(out["gpus"], out["use_gpu"])
        if out["multi_gpu"] not in ("shard", "replicate"):
            raise ValueError(f"index_options['multi_gpu'] must be 'shard' or 'replicate', got {out['multi_gpu']!r}")
    return out


def _gpu_list(gpus, use_gpu) -> Optional[list]:
    """``gpus`` as a list of distinct GPU ids (JSON-serializable in the memory's config), or None."""
    if gpus is None:
        return None
    if not isinstance(gpus, (list, tuple)):
        raise TypeError(f"index_options['gpus'] must be a list of GPU ids or None, got {type(gpus).__name__}")
    if not gpus:
        raise ValueError("index_options['gpus'] must name at least one GPU (None: the memory's device)")
    for g in gpus:
        _int_at_least("gpus", g, 0, "GPU ids start at 0")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"index_options['gpus'] names a GPU twice: {list(gpus)}")
    if use_gpu is False:
        raise ValueError("index_options['gpus'] puts the index on GPUs, but index_options['use_gpu'] is False")
    return list(gpus)
