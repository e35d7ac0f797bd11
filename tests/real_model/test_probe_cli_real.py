"""`memlayers probe ... --model smollm2` on the real model: the embedded name loads through
load_pretrained, the context check knows its 8K positions, and a short passkey is answered."""
import json

from memlayers.cli import main


def test_passkey_probe_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["probe", "passkey", "--model", "smollm2", "--lengths", "256", "--depths", "0.5",
               "--samples", "1", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    (cell,) = (out / "passkey" / "cells").glob("*.json")
    record = json.loads(cell.read_text())
    assert record["config"]["model"] == "smollm2" and record["context_length"] == 256
    assert record["score"] == 1.0, record["samples"][0]["response"]


def test_lengths_past_the_models_positions_fail_before_loading(tmp_path, capsys):
    rc = main(["probe", "passkey", "--model", "smollm2", "--lengths", "9000", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "9000 tokens exceed the model's 8192 positions" in capsys.readouterr().err
