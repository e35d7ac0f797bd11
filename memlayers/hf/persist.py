"""Saving a model with its memories, and loading it back (in another process).

``save_pretrained`` writes the model exactly as transformers would without memlayers (the original
modules are swapped back in for the save, so the checkpoint loads anywhere), plus two files:

- ``memlayers.json``: the attachments' configs (layer indices resolved) and the model they were
  attached to (model type and shapes: ``load_memory`` refuses another);
- ``memlayers.safetensors``: every tensor the attachments own (kNN stores, gates, Titans and DKVB
  parameters and states, the per-row counts of memorized tokens), named by the path of the owning
  wrapper in the model (``model.layers.1.self_attn.memory.keys``, ``model.rotary_emb.offset``).

Both files are serialized before anything is written, each lands atomically (a temporary file
renamed into place), and they are written before the model's checkpoint: a failed save leaves no
checkpoint without its memory file.
``from_pretrained`` loads the model with transformers, re-attaches, and restores those tensors.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Union

import torch
from torch import nn

from .attach import attach
from .config import config_from_dict
from .families import base_model, family_of
from .state import attached_configs, install, installed, require_attached, uninstall

CONFIG_NAME = "memlayers.json"
STATE_NAME = "memlayers.safetensors"
FORMAT = "memlayers.hf/2"
BASE = "base_layer."


def _own_state(wrapper) -> Dict[str, torch.Tensor]:
    """The wrapper's tensors without the wrapped module's (those are the model's checkpoint)."""
    return {k: v for k, v in wrapper.state_dict().items() if not k.startswith(BASE)}


def model_signature(model: nn.Module) -> Dict[str, object]:
    """What a memory checkpoint must match: the model type and the shapes the memories depend on."""
    family = family_of(model)
    q_heads, kv_heads, head_dim = family.heads(model.config)
    return {
        "model_type": getattr(model.config, "model_type", None), "hidden_size": model.config.hidden_size,
        "num_layers": len(family.layers(base_model(model))), "q_heads": q_heads, "kv_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": model.config.vocab_size,
    }


def _paths(model: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model, save_directory: Union[str, os.PathLike], **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` plus the attached memories and their state.

    The checkpoint itself is the plain model's (loadable without memlayers); ``from_pretrained``
    restores the memories too.
    """
    slots = require_attached(model)
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    from safetensors.torch import save as serialize

    paths = _paths(model)
    tensors = {}
    for slot in slots:
        prefix = paths[id(slot.wrapper)]
        for name, t in _own_state(slot.wrapper).items():
            # A copy of its own: tensors that share storage (views) cannot be saved by safetensors.
            tensors[f"{prefix}.{name}"] = t.detach().to("cpu", copy=True).contiguous()
    meta = {"format": FORMAT, "model": model_signature(model),
            "attachments": [c.to_dict() for c in attached_configs(model)]}
    config_bytes = (json.dumps(meta, indent=2) + "\n").encode()
    state_bytes = serialize(tensors, metadata={"format": FORMAT})  # fails here, before anything is written

    # The memory files first: a folder that holds the model's checkpoint holds its memories too.
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomic(directory / STATE_NAME, state_bytes)
    _write_atomic(directory / CONFIG_NAME, config_bytes)
    installed_slots = uninstall(model)
    try:
        model.save_pretrained(save_directory, **kwargs)
    finally:
        install(model, installed_slots)


def _read_meta(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"directory: {path} is not a readable memlayers config ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"directory: {path} has format {found!r}, expected {FORMAT!r}")
    for key in ("model", "attachments"):
        if key not in meta:
            raise ValueError(f"directory: {path} has no {key!r} entry")
    return meta


def load_memory(model, directory: Union[str, os.PathLike]):
    """Attach the memories saved in ``directory`` to ``model`` (which has none) and restore their
    state. Returns the model.

    Raises ``ValueError`` (the model left exactly as it was, so a retry works) when the files are
    missing or damaged, when they were saved from another model type or shape, or when a saved
    tensor does not fit or belongs to nothing attached.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    directory = Path(directory)
    for name in (CONFIG_NAME, STATE_NAME):
        if not (directory / name).is_file():
            raise ValueError(f"directory: {directory} holds no {name} (was it saved with memlayers.save_pretrained?)")
    if installed(model):
        raise ValueError("model already has memory attached; load into a model without attachments")
    meta = _read_meta(directory)
    mine = model_signature(model)
    diff = {k: (v, mine.get(k)) for k, v in meta["model"].items() if mine.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: saved {a!r}, model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"directory: {directory / CONFIG_NAME} holds memories of another model ({detail})")
    configs = [config_from_dict(d) for d in meta["attachments"]]

    from safetensors.torch import load_file

    try:
        loaded = load_file(str(directory / STATE_NAME))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"directory: {directory / STATE_NAME} is not a readable safetensors file ({e})") from None
    device = next(model.parameters()).device
    tensors = {k: v.to(device) for k, v in loaded.items()}
    attach(model, configs)
    try:
        paths = _paths(model)
        claimed = set()
        for slot in installed(model):
            prefix = paths[id(slot.wrapper)] + "."
            own = {k[len(prefix):]: v for k, v in tensors.items()
                   if k.startswith(prefix) and not k[len(prefix):].startswith(BASE)}
            claimed.update(prefix + k for k in own)
            _load_wrapper(slot.wrapper, own, prefix)
        unclaimed = sorted(set(tensors) - claimed)
        if unclaimed:
            raise ValueError(f"directory: {directory / STATE_NAME} holds tensors no attachment claims: {unclaimed}")
    except Exception:
        uninstall(model)  # the model as it was: nothing attached
        raise
    return model


def _load_wrapper(wrapper, tensors: Dict[str, torch.Tensor], prefix: str) -> None:
    if hasattr(wrapper, "prepare_load"):
        wrapper.prepare_load(tensors)  # build stores of the saved batch size first
    try:
        result = wrapper.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise ValueError(f"saved memory state of {prefix.rstrip('.')} does not fit: {e}") from None
    missing = [k for k in result.missing_keys if not k.startswith(BASE)]
    if missing or result.unexpected_keys:
        raise ValueError(f"saved memory state of {prefix.rstrip('.')} does not fit the attachment: missing "
                         f"{missing}, unexpected {result.unexpected_keys}")


def from_pretrained(pretrained_model_name_or_path, model_class=None, **kwargs):
    """Load a model saved by ``save_pretrained`` with its memories.

    Args:
        pretrained_model_name_or_path: the saved directory.
        model_class: a transformers model class (default ``AutoModelForCausalLM``).
        kwargs: passed to ``model_class.from_pretrained`` (``torch_dtype``, ``device_map``, ...).
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return load_memory(model, pretrained_model_name_or_path)
