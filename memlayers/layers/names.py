"""Old argument names of layers and configs, kept working for one release with a DeprecationWarning.

Today's names: the count of retrieved items is ``top_k`` (modules and configs; ops say ``k``); the
kNN store's choice is ``index="exact"|"flat"|"ivf"|"hnsw"``; ``backend`` is the compute backend
(``"auto"``, ``"torch"``, ``"triton"``, ``"native"`` where an op has one) everywhere. Before 0.2 the
count was also ``topk``, the store's choice ``store``/``memory_backend`` (``"exact"|"faiss"``, with
``index`` naming the FAISS index), and the store's compute backend ``search_backend``.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

from ..memory.names import INDEXES
from ..ops.utils import check_choice


def warn_renamed(owner: str, old: str, new: str, stacklevel: int = 4) -> None:
    warnings.warn(f"{owner}({old}=...) is deprecated and will be removed in the next release; pass {new}=...",
                  DeprecationWarning, stacklevel=stacklevel)


def renamed(owner: str, old: str, old_value, new: str, new_value, default):
    """The value of ``new``, taking the deprecated ``old`` (not None) with a warning."""
    if old_value is None:
        return new_value
    warn_renamed(owner, old, new, stacklevel=5)
    if new_value != default and new_value != old_value:
        raise ValueError(f"{owner}: {new}={new_value!r} and the deprecated {old}={old_value!r} disagree")
    return old_value


def knn_index(owner: str, index: Optional[str], store_name: str, store: Optional[str]) -> str:
    """The kNN store's ``index`` from today's ``index`` and the deprecated ``store_name`` (``store`` or
    ``memory_backend``: ``"exact"|"faiss"``, under which ``index`` named the FAISS index)."""
    if store is not None:
        warn_renamed(owner, store_name, "index", stacklevel=5)
        check_choice(store_name, store, ("exact", "faiss"))
        if store == "exact":
            index = "exact"  # the old API ignored index under the exact store
        elif index == "exact":
            raise ValueError(f"{owner}: index='exact' contradicts {store_name}='faiss'; pass index='flat'|'ivf'|'hnsw'")
        else:
            index = "flat" if index is None else index
    index = "exact" if index is None else index
    check_choice("index", index, INDEXES)
    return index


def knn_backend(owner: str, backend: str, search_backend: Optional[str]) -> Tuple[str, str]:
    """``(backend of the ops, backend of the store's search)``: one ``backend`` serves both; the
    deprecated ``search_backend`` (not None) still sets the search's alone."""
    if search_backend is None:
        return backend, backend
    warn_renamed(owner, "search_backend", "backend", stacklevel=5)
    return backend, search_backend


__all__ = ["warn_renamed", "renamed", "knn_index", "knn_backend"]
