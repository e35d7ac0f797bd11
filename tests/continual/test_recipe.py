"""The continual-injection recipe (models/continual_injection/run.py) end to end on a tiny Llama with a
character tokenizer: every method runs, results are written, unlearning is exact."""
import importlib.util
import json
import sys
from pathlib import Path

import torch

from conftest import tiny_llama

RECIPE = Path(__file__).resolve().parents[2] / "models" / "continual_injection"


def load_recipe():
    sys.path.insert(0, str(RECIPE))
    try:
        spec = importlib.util.spec_from_file_location("continual_injection_run", RECIPE / "run.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPE))


class CharTokenizer:
    """Bytes as tokens (the tiny model's vocabulary is 96 ids: printable ASCII shifted down by 32)."""

    pad_token_id = 0
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [min(max(ord(c) - 31, 1), 95) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i + 31) for i in ids)


def test_recipe_runs_every_method_and_unlearns_exactly(tmp_path):
    run = load_recipe()
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=32)
    cfg = dict(facts=4, batches=2, train_questions=1, heldout_questions=1, steps=2, batch_size=4, pkm_layers=[1],
               num_keys=8, top_k=4, heads=2, slots_per_fact=6, lora_rank=2, backend="torch",
               background_samples=20, background_tokens=5,
               lrs={"sparse_memory": [0.1], "dense_memory": [0.01], "lora": [1e-3, 1e-2], "full": [1e-3]})
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    result = run.run_experiment(model, CharTokenizer(), cfg, "tiny", "cpu", tmp_path)
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["summary"] == result["summary"] and set(saved["runs"]) == set(run.METHODS)
    assert (tmp_path / "tiny_retention.png").stat().st_size > 0
    assert "| sparse_memory |" in (tmp_path / "tiny.md").read_text()
    assert [len(r["history"]) for r in result["runs"].values()] == [2] * 4
    assert len(result["sweep"]["lora"]) == 2
    assert "Learning-rate sweep" in (tmp_path / "tiny.md").read_text()
    # Retention went through the probe's parametric mode: one record per (batch injected, facts batch).
    from memlayers.probes import load_records

    for name, run_ in result["runs"].items():
        records = load_records(tmp_path / "tiny_retention" / name)
        got = {(r["after_batch"], r["facts_batch"]): r["score"] for r in records}
        assert got == {(b, j): h["heldout_acc"][j] for b, h in enumerate(run_["history"]) for j in range(b + 1)}
    u = result["runs"]["sparse_memory"]["unlearning"]
    assert u["slots_reset"] > 0 and u["everything_else_bit_identical"] is True
    # Every method leaves the model as it found it.
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())
    assert not hasattr(model, "peft_config") or not model.peft_config


def test_recipe_injector_feeds_the_retention_probe(tmp_path):
    """``Experiment.injector`` (what ``memlayers probe retention --inject ...run.py:injector`` runs):
    one call per batch, each returning the held-out accuracy of every batch so far."""
    import pytest

    from memlayers.probes import run_parametric_retention

    run = load_recipe()
    torch.manual_seed(0)
    cfg = dict(facts=4, batches=2, train_questions=1, heldout_questions=1, steps=2, batch_size=4, pkm_layers=[1],
               num_keys=8, top_k=4, heads=2, slots_per_fact=6, lora_rank=2, backend="torch")
    exp = run.Experiment(tiny_llama(layers=2, hidden=32), CharTokenizer(), cfg, "cpu")
    _, inject, history, _ = exp.injector("sparse_memory", 0.1)
    records = run_parametric_retention(inject, tmp_path, batches=2, progress=False, plots=False)
    assert {(r["after_batch"], r["facts_batch"]): r["score"] for r in records} == {
        (b, j): h["heldout_acc"][j] for b, h in enumerate(history) for j in range(b + 1)}
    assert all(r["old_acc"] == history[r["after_batch"]]["old_acc"] for r in records)
    with pytest.raises(ValueError, match="batch 2 does not exist"):
        inject(2)
    with pytest.raises(ValueError, match="method must be one of"):
        run.injector("adapter")


def test_sampled_background_texts_are_seeded_and_counted():
    run = load_recipe()
    torch.manual_seed(0)
    model = tiny_llama(layers=2, hidden=32)
    texts = run.sampled_texts(model, CharTokenizer(), 20, 5, seed=3, device="cpu")
    assert len(texts) == 20 and texts == run.sampled_texts(model, CharTokenizer(), 20, 5, seed=3, device="cpu")
    # 20 texts over 16 openings: the first 4 openings twice, the others once; 5 sampled tokens each
    openings = [o for i, o in enumerate(run.OPENINGS) for _ in range(2 if i < 4 else 1)]
    tok = CharTokenizer()
    assert all(t.startswith(o) and len(tok.encode(o)) < len(tok.encode(t)) <= len(tok.encode(o)) + 5
               for t, o in zip(texts, openings))
    assert run.sampled_texts(model, CharTokenizer(), 0, 5, seed=3, device="cpu") == []
