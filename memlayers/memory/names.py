"""The store's two choices and their names: ``index`` (what is searched) and ``backend`` (what computes).

- ``index``: ``"exact"`` (exact top-k over the ring buffer, ``ml.knn_search``), or a FAISS index:
  ``"flat"``, ``"ivf"`` (IVF-Flat), ``"hnsw"``.
- ``backend``: the compute backend of the exact search, passed to ``ml.knn_search``'s dispatcher:
  ``"auto"``, ``"torch"``, ``"triton"``, ``"native"``.

Until version 0.2 the store's choice was ``backend="exact"|"faiss"`` (with ``index=`` naming the FAISS
index) and the compute backend was ``search_backend=``. Those spellings keep working for one release,
with a ``DeprecationWarning``; files saved under them keep loading (silently: the user did nothing).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

from ..ops.utils import check_choice

INDEXES = ("exact", "flat", "ivf", "hnsw")
FAISS_INDEXES = ("flat", "ivf", "hnsw")
COMPUTE_BACKENDS = ("auto", "torch", "triton", "native")
_OLD_STORES = ("exact", "faiss")


def store_names(index: Optional[str], backend: str, search_backend: Optional[str]) -> Tuple[str, str]:
    """``(index, backend)`` from the constructor's arguments, old spellings translated with a warning.

    ``index=None`` means ``"exact"`` (or ``"flat"`` under the old ``backend="faiss"``, its old default).
    """
    if backend in _OLD_STORES:
        warnings.warn(
            f"KNNMemory(backend={backend!r}) is deprecated and will be removed in the next release: the store's "
            f"choice is index='exact'|'flat'|'ivf'|'hnsw', and backend names the compute backend "
            f"{COMPUTE_BACKENDS}", DeprecationWarning, stacklevel=3)
        if backend == "exact":
            index = "exact"  # the old API ignored index= under backend="exact"
        elif index == "exact":
            raise ValueError("index='exact' contradicts backend='faiss'; pass index='flat'|'ivf'|'hnsw'")
        else:
            index = "flat" if index is None else index
        backend = "auto"
    if search_backend is not None:
        warnings.warn(
            "KNNMemory(search_backend=...) is deprecated and will be removed in the next release: pass "
            "backend=... (the compute backend of the exact search)", DeprecationWarning, stacklevel=3)
        if backend != "auto" and backend != search_backend:
            raise ValueError(f"backend={backend!r} and the deprecated search_backend={search_backend!r} disagree")
        backend = search_backend
    index = "exact" if index is None else index
    check_choice("index", index, INDEXES)
    check_choice("backend", backend, COMPUTE_BACKENDS)
    return index, backend


def upgrade_config(config: dict) -> dict:
    """A saved ``KNNMemory.config()`` in today's names (files written before the rename keep loading)."""
    config = dict(config)
    if "search_backend" in config:
        store = config.pop("backend")
        config["backend"] = config.pop("search_backend")
        if store == "exact":
            config["index"] = "exact"
            config["index_options"] = {}  # ignored by the old exact store, rejected by index="exact"
    return config
