"""``index_options`` of a FAISS-backed ``KNNMemory``: checked and completed before anything is built.

FAISS aborts the process on some bad parameters (``hnsw_m=0``) and fails late on others (an IVF index
asked to train on fewer vectors than it has lists fails inside ``add``), so every option is checked
here, against the index it applies to and the memory's capacity, up front.
"""
from __future__ import annotations

from typing import Optional

_DEFAULTS = {
    "flat": {"use_gpu": None},
    "ivf": {"nlist": 64, "nprobe": 8, "train_size": None, "use_gpu": None},
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
        flat: ``use_gpu`` (None: when faiss has GPUs and the memory is on CUDA).
        ivf: ``nlist`` (>= 1, default 64), ``nprobe`` (>= 1, default 8; FAISS probes at most nlist),
            ``train_size`` (nlist..capacity, default ``min(max(39 * nlist, 256), capacity)``: vectors a
            row/head gathers before its index trains; searched exactly until then), ``use_gpu``.
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
    return out
