"""``--window N``: the three conditions of a long-context probe (window only, memory + window, full context)."""
import argparse
import json

import pytest
import torch

from memlayers.probes import HFResponder, passkey_sample
from memlayers.probes.cli import add_probe_parser, run_probe
from memlayers.probes.haystack import prompt_tokens


def main(argv):
    parser = argparse.ArgumentParser(prog="memlayers")
    sub = parser.add_subparsers(dest="command", required=True)
    add_probe_parser(sub)
    return run_probe(parser.parse_args(argv))


class _Recorder(torch.nn.Module):
    """A stand-in model: records the ids ``generate`` is given and answers one token."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.generated_from = None

    def generate(self, input_ids, **kwargs):
        self.generated_from = input_ids[0].tolist()
        return torch.cat([input_ids, input_ids[:, :1]], dim=1)


@pytest.fixture
def memorized(monkeypatch):
    """The ids ``memorize`` receives (each call's list), without a memory."""
    import memlayers.hf as mh

    calls = []
    monkeypatch.setattr(mh, "memorize", lambda model, ids, chunk_size: calls.append(ids[0].tolist()))
    monkeypatch.setattr(mh, "reset_memory", lambda model: model)
    return calls


@pytest.mark.parametrize("window", [7, 40])
def test_the_three_conditions_read_the_right_tokens(tokenizer, memorized, window):
    sample = passkey_sample(tokenizer, 300, 0.5, seed=3)
    context = tokenizer.encode(sample.context, add_special_tokens=True)
    query = tokenizer.encode(sample.query, add_special_tokens=False)
    model = _Recorder()

    HFResponder(model, tokenizer, max_new_tokens=1)(sample)  # (c) full context
    assert model.generated_from == prompt_tokens(tokenizer, sample.context, sample.query) == context + query
    HFResponder(model, tokenizer, max_new_tokens=1, window=window)(sample)  # (a) window only
    assert model.generated_from == context[-window:] + query and not memorized
    HFResponder(model, tokenizer, max_new_tokens=1, window=window, memory=True, chunk_size=16)(sample)  # (b)
    assert memorized == [context[:-window]] and model.generated_from == context[-window:] + query


def test_a_window_longer_than_the_context_memorizes_nothing(tokenizer, memorized):
    sample = passkey_sample(tokenizer, 200, 0.5)
    context = tokenizer.encode(sample.context, add_special_tokens=True)
    model = _Recorder()
    HFResponder(model, tokenizer, max_new_tokens=1, window=10_000, memory=True)(sample)
    assert not memorized and model.generated_from[:len(context)] == context


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window(tokenizer, window):
    with pytest.raises(ValueError, match="window"):
        HFResponder(_Recorder(), tokenizer, window=window)


def test_cli_window_with_and_without_memory(model_dir, tmp_path, capsys):
    common = ["--model", str(model_dir), "--lengths", "256", "--depths", "0.5", "--max-new-tokens", "2",
              "--no-progress", "--window", "64"]
    assert main(["probe", "passkey", *common, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    assert main(["probe", "passkey", *common, "--memory", "knn", "--memory-option", "capacity=512",
                 "--chunk-size", "64", "--out", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    for cond, memory in (("a", "none"), ("b", "knn")):
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / cond / "passkey" / "cells").glob("*.json")]
        assert rec["config"]["window"] == 64 and rec["config"]["memory"]["kind"] == memory
    # Another window into the same folder is another run: refused, as other settings are.
    assert main(["probe", "passkey", *common[:-1], "32", "--out", str(tmp_path / "a")]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_cli_window_only_is_not_bound_by_the_model_positions(model_dir, tmp_path, capsys):
    # 8k tokens exceed the tiny model's 4096 positions; the window alone (and the question) fits.
    argv = ["probe", "passkey", "--model", str(model_dir), "--lengths", "8k", "--depths", "0.5",
            "--max-new-tokens", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 2 and "positions" in capsys.readouterr().err
    assert main([*argv, "--window", "64"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_cli_bad_window(value):
    with pytest.raises(SystemExit):
        main(["probe", "passkey", "--model", "m", "--out", "o", "--window", value])
