"""``bench/diagnose_knn_recall.py`` on a tiny random Llama: the in-memory report, and for a needle inside
the window the memory's share per layer and the answers with a third of the layers not reading it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import diagnose_knn_recall as diag  # noqa: E402

import memlayers.hf as mh  # noqa: E402
from memlayers.hf.knn import KNNAttention  # noqa: E402


@pytest.fixture()
def model(model_dir):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(model_dir).eval()
    # The torch path, as the script runs on CPU (the suite's TRITON_INTERPRET would interpret kernels).
    mh.attach(m, mh.KNNMemoryConfig(top_k=8, backend="torch"))
    return m


def test_needle_inside_the_window(model, tokenizer):
    combine = diag.knn_wrapper.combine_memory
    entry = diag.diagnose(model, tokenizer, "passkey", 700, 1.0, 0, 96, [8], max_new_tokens=4)
    assert entry["needle_in_window"] and entry["memorized_tokens"] > 0
    assert [row["layer"] for row in entry["layers"]] == [0, 1]
    assert all(0.0 <= row["memory_share_mean"] <= row["memory_share_max"] <= 1.0 for row in entry["layers"])
    assert set(entry["answer"]) == {"response", "score"}
    assert sorted(entry["no_memory_in"]) == ["0-0", "1-1"]  # 2 layers: the first third is empty
    # Nothing patched stays patched.
    assert diag.knn_wrapper.combine_memory is combine
    assert all("holds_memories" not in vars(w) for w in model.modules() if isinstance(w, KNNAttention))


def test_needle_in_the_memory(model, tokenizer):
    entry = diag.diagnose(model, tokenizer, "passkey", 700, 0.0, 0, 96, [4, 8])
    assert "needle_in_window" not in entry and entry["needle_tokens"] > 0
    layer = entry["layers"][0]
    assert 0 <= layer["needle_rank_min"] <= layer["needle_rank_median"]
    assert {"top4_needle_tokens_mean", "top8_distinct_tokens_mean"} <= set(layer)
    assert torch.is_tensor(model.model.layers[0].self_attn.memory.keys)
