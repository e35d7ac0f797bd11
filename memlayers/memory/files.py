"""``KNNMemory`` files: safetensors with one metadata entry, written atomically, read with checks.

Format 2 (written now): the state dict's tensors, and one metadata entry ``"memlayers"`` holding sorted
JSON ``{"format": "memlayers.KNNMemory/2", "config": {...}, "sha256": ...}``. One entry because
safetensors writes its metadata map in arbitrary order (two entries: different bytes for the same
memory); the SHA-256 covers every tensor's name, dtype, shape and bytes, so a flipped byte anywhere
is caught. Format 1 (metadata ``"format"`` and ``"config"``, no checksum) keeps loading.

Writing: the bytes go to ``<target>.<pid>.partial`` in the target's folder, which is then renamed over
the target (``os.replace``: atomic on POSIX and Windows), so a reader sees the old file or the new one,
never half of one. Any exception (KeyboardInterrupt included) removes the partial file. A process
killed outright (SIGKILL, power loss) cannot clean up: its ``.partial`` file stays visible next to the
target, and the next save to that target removes it once its process is gone.

Reading: every problem (missing file, not a file, damaged header, not a KNNMemory file, bad checksum,
bad contents) is a ``ValueError`` (``FileNotFoundError`` for a missing file) naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch

FORMAT = "memlayers.KNNMemory/2"
_OLD_FORMAT = "memlayers.KNNMemory/1"
_META_KEY = "memlayers"


def checksum(tensors: Dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(path: Path) -> None:
    for leftover in path.parent.glob(f"{path.name}.*.partial"):
        pid = leftover.name[len(path.name) + 1: -len(".partial")]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            leftover.unlink(missing_ok=True)


def write(path, tensors: Dict[str, torch.Tensor], config: dict) -> None:
    """Write ``tensors`` and ``config`` to ``path`` atomically (see the module docstring)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    meta = json.dumps({"format": FORMAT, "config": config, "sha256": checksum(tensors)}, sort_keys=True)
    _remove_dead_partials(path)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata={_META_KEY: meta})
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def read(path) -> Tuple[Dict[str, torch.Tensor], dict, str]:
    """``(tensors, config, format)`` of a KNNMemory file, checksum verified (format 2)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such KNNMemory file")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file, so not a saved KNNMemory")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        if _META_KEY in meta:
            info = json.loads(meta[_META_KEY])
            fmt, config, digest = info["format"], info["config"], info["sha256"]
        else:
            fmt, config, digest = meta.get("format"), json.loads(meta.get("config", "null")), None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} has damaged KNNMemory metadata ({type(e).__name__}: {e})") from None
    if fmt not in (FORMAT, _OLD_FORMAT) or not isinstance(config, dict):
        raise ValueError(f"{path} is not a saved KNNMemory (format {fmt!r})")
    if digest is not None and checksum(tensors) != digest:
        raise ValueError(f"{path} is damaged: its tensors do not match the checksum written with them")
    return tensors, config, fmt
