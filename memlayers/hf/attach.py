"""``attach`` / ``detach``: memory layers into a HuggingFace causal LM, in place, and back out."""
from __future__ import annotations

import dataclasses
from typing import List, Sequence, Union

from torch import nn

from . import knn_attach, layer_attach, pkm_branch
from .attention import register
from .config import is_config, resolve_layers
from .families import base_model, family_of
from .state import AttachPlan, install, memory_wrappers, positions_of, require_attached, uninstall


def _as_list(config) -> List:
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs:
        raise ValueError("config must be a memory config or a non-empty list of them")
    for c in configs:
        if not is_config(c):
            raise TypeError(
                "config must be a KNNMemoryConfig, TitansMemoryConfig, DKVBConfig or PKMConfig (or a list of them), "
                f"got {type(c).__name__}"
            )
    return configs


BUILDERS = {"knn": knn_attach.build, **layer_attach.BUILDERS, "pkm": pkm_branch.build}


def attach(model: nn.Module, config: Union[object, Sequence[object]]) -> nn.Module:
    """Attach memory layers to ``model`` in place and return it.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2, Qwen3 or GPT-2 family), or its
            decoder stack.
        config: a ``KNNMemoryConfig``, ``TitansMemoryConfig``, ``DKVBConfig`` or ``PKMConfig``, or a
            list of them.
            Each replaces modules of the chosen decoder layers by wrappers that keep the original as
            ``base_layer``; ``detach(model)`` puts the originals back.

    Raises ``TypeError``/``ValueError`` (the model unchanged) for an unsupported model, a bad config,
    a layer index out of range, or a memory of the same kind already attached to a chosen layer.

    Example:
        >>> import memlayers as ml
        >>> model = ml.attach(model, ml.KNNMemoryConfig(layers=[-4, -3, -2, -1], top_k=32))
        >>> ml.memorize(model, long_ids, chunk_size=512)
        >>> model.generate(question_ids, max_new_tokens=20)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a transformers model), got {type(model).__name__}")
    family = family_of(model)
    configs = _as_list(config)
    decoder = family.layers(base_model(model))
    present = memory_wrappers(model)

    # Validate everything before touching the model.
    taken = {(w.attachment_kind, w.layer_index) for w in present}
    plans = []
    for c in configs:
        layers = resolve_layers(c.layers, decoder)
        for i in layers:
            if (c.kind, i) in taken:
                raise ValueError(f"config: a {c.kind} memory is already attached to decoder layer {i}; detach first")
            taken.add((c.kind, i))
        plans.append(dataclasses.replace(c, layers=layers))
    if any(c.kind == "knn" for c in plans) and positions_of(model) is None:
        _check_implementation(model, family)
        register(model.config._attn_implementation, family)  # raises for an unsupported implementation

    # Build every wrapper before installing any: a failing build leaves the model as it was.
    plan = AttachPlan(family=family)
    first = 1 + max((w.attachment for w in present), default=-1)
    for n, c in enumerate(plans):
        slots = BUILDERS[c.kind](model, c, plan)
        for slot in slots:
            slot.wrapper.attachment = first + n
        plan.building.extend(slots)
    install(model, plan.building)
    return model


def detach(model: nn.Module) -> nn.Module:
    """Remove every attachment: the model's original modules (the same objects) and attention
    implementation are back, and its outputs are bit-identical to before ``attach``. Returns it."""
    require_attached(model)
    uninstall(model)
    return model


def _check_implementation(model: nn.Module, family) -> None:
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"model must be a transformers PreTrainedModel to attach kNN memory, got {type(model).__name__}")
    if (family.name == "gpt2" and model.config._attn_implementation == "eager"
            and getattr(model.config, "reorder_and_upcast_attn", False)):
        # GPT-2 takes that path only under the implementation named "eager", which attach renames.
        raise ValueError("model: GPT-2 with reorder_and_upcast_attn=True under eager attention is not supported "
                         "with kNN memory; load it with attn_implementation='sdpa'")
