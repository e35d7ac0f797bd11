"""Per-row memories, reset_memory, and saving/loading a model with its memories (fresh process)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import memlayers.hf as mm
from memlayers.ops.utils.testing import rel_err

from hf_tiny import VOCAB, logits, tiny_model


def test_rows_are_independent_and_reset_rows_forgets_only_them():
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 60))
    full0 = logits(model, ids[:1])
    alone1 = logits(model, ids[1:, 40:])
    mm.attach(model, [mm.KNNMemoryConfig(top_k=64, backend="torch"),
                      mm.TitansMemoryConfig(layers=[0], chunk_size=16, backend="torch")])
    mm.memorize(model, ids[:, :40], chunk_size=16)
    titans = model.model.layers[0]
    kept = titans.titans_memory.weights_0[0].clone()
    mm.reset_memory(model, rows=[False, True])  # a list of bools is a mask: row 1 (not rows 0 and 1)
    out = logits(model, ids[:, 40:])
    assert rel_err(out[:1], full0[:, 40:]) < 1e-4   # row 0 still has its memory
    assert rel_err(out[1:], alone1) < 1e-4          # row 1 starts over, at position 0
    mem = model.model.layers[1].self_attn.memory
    assert mem.count.tolist() == [40, 0]
    assert torch.equal(titans.titans_memory.weights_0[0], kept)
    fresh = titans.titans_memory.neural_memory.initial_state(1).weights[0][0]
    assert torch.equal(titans.titans_memory.weights_0[1], fresh)


def test_batch_size_is_fixed_until_a_full_reset():
    model = tiny_model("llama")
    mm.attach(model, mm.KNNMemoryConfig(top_k=8, backend="torch"))
    mm.memorize(model, torch.randint(1, VOCAB, (2, 10)), chunk_size=8)
    try:
        mm.memorize(model, torch.randint(1, VOCAB, (3, 10)))
        raise AssertionError("expected ValueError")
    except ValueError as e:
        assert "input_ids" in str(e)
    assert model.model.layers[0].self_attn.memory.count.tolist() == [10, 10]
    mm.reset_memory(model)
    mm.memorize(model, torch.randint(1, VOCAB, (3, 10)))
    assert model.model.layers[0].self_attn.memory.count.tolist() == [10, 10, 10]


LOAD_SCRIPT = textwrap.dedent("""
    import sys, torch
    import memlayers.hf as mm
    torch.set_num_threads(1)
    model = mm.from_pretrained(sys.argv[1]).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        out = model(ids).logits
    torch.save(out, sys.argv[3])
""")


def test_save_and_load_in_a_fresh_process(tmp_path: Path):
    model = tiny_model("qwen2")
    ids = torch.randint(1, VOCAB, (2, 50))
    mm.attach(model, [mm.KNNMemoryConfig(layers=[0, 1], top_k=64, combine="gate", backend="torch"),
                      mm.TitansMemoryConfig(layers=[1], chunk_size=16, backend="torch"),
                      mm.DKVBConfig(layers=[0], num_codebooks=4, num_keys=32, key_dim=8, backend="torch")])
    with torch.no_grad():  # trained-looking gates, so that every piece of state matters
        model.model.layers[1].titans_gate.fill_(0.5)
        model.model.layers[0].dkvb_gate.fill_(0.5)
        model.model.layers[0].base_layer.self_attn.gate.fill_(1.0)
    mm.memorize(model, ids[:, :36], chunk_size=16)
    expected = logits(model, ids[:, 36:])
    mm.save_pretrained(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "memlayers.json").read_text())["attachments"][0]["layers"] == [0, 1]
    torch.save(ids[:, 36:], tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "saved"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)
    # The checkpoint itself is the plain model: transformers loads it without memlayers.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    mm.detach(model)
    assert torch.equal(logits(plain, ids), logits(model, ids))
