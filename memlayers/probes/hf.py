"""HuggingFace causal LMs as probe responders, with or without memlayers memory attached.

transformers is imported inside the functions: ``import memlayers`` must not pull it in.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from .generators import ProbeSample
from .haystack import prompt_tokens

MEMORY_KINDS = ("none", "knn", "titans")
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model or tokenizer could not be loaded (missing path, no network for a hub name, ...)."""


class MemoryUnavailableError(RuntimeError):
    """memlayers.hf (the HuggingFace integration) is not available in this installation."""


def _looks_like_path(name: str) -> bool:
    # hub names are "name" or "org/name"; anything else is meant as a local path
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _is_pretrained_source(name_or_path: str) -> bool:
    """The embedded model's name, or a GGUF file: what ``memlayers.hf.load_pretrained`` reads."""
    from ..hf.pretrained import EMBEDDED

    return name_or_path.lower() in EMBEDDED or name_or_path.endswith(".gguf")


def load_model(name_or_path: str, *, dtype: str = "auto", device: Optional[str] = None, tokenizer: bool = True):
    """Load ``(model, tokenizer)``: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct) or a ``.gguf``
    file through ``memlayers.hf.load_pretrained``, else a local folder or, where the network allows, a
    hub name (``tokenizer=False``: the tokenizer is ``None``, for models read on raw token ids).

    Raises ``ModelLoadError`` (a ``ValueError``) with the reason when either cannot be loaded."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise TypeError(f"model must be a non-empty str (a local path or a hub name), got {name_or_path!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if _is_pretrained_source(name_or_path):
        from ..hf.pretrained import load_pretrained

        try:  # GGUF weights are dequantized: "auto" means fp32
            model, tok = load_pretrained(os.path.expanduser(name_or_path),
                                         dtype=torch.float32 if dtype == "auto" else DTYPES[dtype],
                                         device=device or "cpu")
        except (OSError, ModuleNotFoundError, ValueError) as e:
            raise ModelLoadError(f"could not load model {name_or_path!r}: {str(e).splitlines()[0]}") from e
        return model, (tok if tokenizer else None)
    path = os.path.expanduser(name_or_path)
    if not os.path.exists(path) and _looks_like_path(name_or_path):
        raise ModelLoadError(f"model path {name_or_path!r} does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ModelLoadError(f"model path {name_or_path!r} is a file; give the folder holding config.json and the tokenizer")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path) if tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except (OSError, ValueError, KeyError) as e:
        where = "the folder" if os.path.isdir(path) else "the hub (is the network reachable?)"
        raise ModelLoadError(f"could not load model {name_or_path!r} from {where}: {str(e).splitlines()[0]}") from e
    if device is not None:
        model.to(device)
    model.eval()
    return model, tok


def attach_memory(model, kind: str, options: Optional[Dict] = None) -> Dict:
    """Attach memlayers memory of ``kind`` (``"knn"`` or ``"titans"``) to ``model`` in place, with
    ``options`` passed to its config class; returns the configuration as a dict for the records.
    ``"none"`` attaches nothing."""
    if kind not in MEMORY_KINDS:
        raise ValueError(f"memory must be one of {MEMORY_KINDS}, got {kind!r}")
    options = dict(options or {})
    if kind == "none":
        if options:
            raise ValueError(f"memory options {sorted(options)} given without a memory (memory='none')")
        return {"kind": "none"}
    try:
        from .. import hf

        attach = hf.attach
        config_cls = {"knn": "KNNMemoryConfig", "titans": "TitansMemoryConfig"}[kind]
        cls = getattr(hf, config_cls)
    except (ImportError, AttributeError) as e:
        raise MemoryUnavailableError(
            f"memory={kind!r} needs memlayers.hf (the HuggingFace integration: attach, {config_cls}), "
            f"which is not available in this installation: {e}"
        ) from e
    try:
        config = cls(**options)
    except TypeError as e:
        raise ValueError(f"bad memory option for {config_cls}: {e}") from e
    attach(model, config)
    described = {"kind": kind}
    if hasattr(config, "__dataclass_fields__"):
        import dataclasses

        described.update({k: _jsonable(v) for k, v in dataclasses.asdict(config).items()})
    else:
        described["config"] = repr(config)
    return described


def _jsonable(v):
    return v if isinstance(v, (bool, int, float, str, type(None), list, dict)) else repr(v)


class HFResponder:
    """Answer probe samples with greedy decoding, under one of three conditions.

    - full context (``window=None``, no memory): the model reads ``context + query``;
    - window only (``window=N``, no memory): the last N context tokens + query, as a model whose
      attention reaches N tokens back would read them;
    - memory (``memory=True``): each sample starts from a reset memory; the context before the last
      ``window`` tokens is written into it with ``memlayers.hf.memorize`` (in ``chunk_size`` pieces)
      and the model generates from the last ``window`` context tokens + query, so everything
      earlier must come back through the memory. ``window=None`` memorizes the whole context and
      generates from the query alone.

    Args:
        model, tokenizer: a causal LM and its tokenizer.
        max_new_tokens: tokens generated per answer.
        memory: whether memlayers memory is attached.
        chunk_size: tokens per ``memorize`` call.
        window: context tokens the model reads directly (None: all of them without memory, none
            with memory).
        name, memory_config: what the records say about the model and memory.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 32, memory: bool = False, chunk_size: int = 512,
                 window: Optional[int] = None, name: Optional[str] = None, memory_config: Optional[Dict] = None):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.memory, self.chunk_size, self.window = max_new_tokens, memory, chunk_size, window
        self.config = {
            "model": name or getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__),
            "memory": memory_config or {"kind": "none"},
            "max_new_tokens": max_new_tokens,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        }
        if memory:
            self.config["chunk_size"] = chunk_size
        if window is not None:
            self.config["window"] = window

    def _read_ids(self, sample: ProbeSample, device) -> list:
        """The token ids the model generates from, after memorizing what precedes them (memory)."""
        if not self.memory and self.window is None:
            return prompt_tokens(self.tokenizer, sample.context, sample.query)
        context = self.tokenizer.encode(sample.context, add_special_tokens=True)
        query = list(self.tokenizer.encode(sample.query, add_special_tokens=False))
        keep = 0 if self.window is None else min(self.window, len(context))
        if self.memory:
            from ..hf import memorize, reset_memory

            reset_memory(self.model)
            earlier = context[:len(context) - keep]
            if earlier:
                memorize(self.model, torch.tensor([earlier], device=device), chunk_size=self.chunk_size)
        return list(context[len(context) - keep:]) + query

    @torch.no_grad()
    def __call__(self, sample: ProbeSample) -> str:
        if not isinstance(sample, ProbeSample):
            raise TypeError(f"sample must be a ProbeSample, got {type(sample).__name__}")
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([self._read_ids(sample, device)], device=device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return self.tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
