"""Saving a model with its memories, and loading it back (in another process).

``save_pretrained`` writes the model exactly as transformers would without memlayers (the original
modules are swapped back in for the save, so the checkpoint loads anywhere), plus two files:

- ``memlayers.json``: the attachments' configs (layer indices resolved);
- ``memlayers.safetensors``: every tensor the attachments own (kNN stores, gates, Titans and DKVB
  parameters and states, the per-row counts of memorized tokens), named
  ``<attachment>.<layer>.<name>`` (``positions.offset`` for the counts).

``from_pretrained`` loads the model with transformers, re-attaches, and restores those tensors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Union

import torch

from .attach import attach
from .config import config_from_dict
from .state import get_state, install, uninstall

CONFIG_NAME = "memlayers.json"
STATE_NAME = "memlayers.safetensors"
FORMAT = "memlayers.hf/1"


def _own_state(wrapper) -> Dict[str, torch.Tensor]:
    """The wrapper's tensors without the wrapped module's (those are the model's checkpoint)."""
    return {k: v for k, v in wrapper.state_dict().items() if not k.startswith("base_layer.")}


def save_pretrained(model, save_directory: Union[str, os.PathLike], **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` plus the attached memories and their state.

    The checkpoint itself is the plain model's (loadable without memlayers); ``from_pretrained``
    restores the memories too.
    """
    state = get_state(model)
    if not isinstance(save_directory, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a path, got {type(save_directory).__name__}")
    configs = [a.config.to_dict() for a in state.attachments]
    tensors = {}
    for ai, att in enumerate(state.attachments):
        for slot in att.slots:
            for name, t in _own_state(slot.wrapper).items():
                tensors[f"{ai}.{slot.layer}.{name}"] = t
    if state.positions is not None:
        tensors["positions.offset"] = state.positions.offset

    uninstall(model, state)
    try:
        model.save_pretrained(save_directory, **kwargs)
    finally:
        install(model, state)

    from safetensors.torch import save_file

    directory = Path(save_directory)
    (directory / CONFIG_NAME).write_text(json.dumps({"format": FORMAT, "attachments": configs}, indent=2) + "\n")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / STATE_NAME),
              metadata={"format": FORMAT})


def load_memory(model, directory: Union[str, os.PathLike]):
    """Attach the memories saved in ``directory`` to ``model`` (which has none) and restore their
    state. Returns the model."""
    directory = Path(directory)
    for name in (CONFIG_NAME, STATE_NAME):
        if not (directory / name).is_file():
            raise ValueError(f"directory: {directory} holds no {name} (was it saved with memlayers.save_pretrained?)")
    if get_state(model, required=False) is not None:
        raise ValueError("model already has memory attached; load into a model without attachments")
    meta = json.loads((directory / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"directory: {CONFIG_NAME} has format {meta.get('format')!r}, expected {FORMAT!r}")
    configs = [config_from_dict(d) for d in meta["attachments"]]

    from safetensors.torch import load_file

    device = next(model.parameters()).device
    tensors = {k: v.to(device) for k, v in load_file(str(directory / STATE_NAME)).items()}
    attach(model, configs)
    state = get_state(model)
    for ai, att in enumerate(state.attachments):
        for slot in att.slots:
            prefix = f"{ai}.{slot.layer}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            _load_wrapper(slot.wrapper, own)
    if state.positions is not None and "positions.offset" in tensors:
        state.positions.offset = tensors["positions.offset"].clone()
        state.sync_offsets()
    return model


def _load_wrapper(wrapper, tensors: Dict[str, torch.Tensor]) -> None:
    if hasattr(wrapper, "prepare_load"):
        wrapper.prepare_load(tensors)  # build stores of the saved batch size first
    result = wrapper.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("base_layer.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"saved memory state does not fit the attachment: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")


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
