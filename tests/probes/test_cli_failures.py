"""Issue 14, the command line: each failure is found before any cell runs (or names the file), is
reported in one line on stderr with exit code 2; plots are optional."""
import json
import sys

import pytest

from test_cli import cells, main

MQAR_MODULE = ["probe", "mqar", "--module", "probe_fixtures:make_induction_head", "--dim", "32", "--lengths", "16",
               "--kv-pairs", "2,4", "--examples", "4", "--vocab-size", "64", "--no-progress"]


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("memlayers probe ") and ": error: " in lines[0]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_without_matplotlib_the_run_writes_records_and_summary_and_says_plots_were_skipped(tmp_path, capsys,
                                                                                           monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main([*MQAR_MODULE, "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    note = [line for line in captured.err.splitlines() if "matplotlib" in line]
    assert len(note) == 1 and "no plots" in note[0] and "memlayers[plots]" in note[0]
    run = tmp_path / "mqar"
    assert len(cells(run)) == 2 and (run / "summary.md").read_text().strip()
    assert not list(run.glob("*.png"))
    assert "summary.md" in captured.out


@pytest.mark.parametrize("probe, option", [("needle", "--lengths"), ("passkey", "--lengths"),
                                           ("retention", "--distances")])
def test_lengths_beyond_the_models_positions_are_refused(model_dir, tmp_path, capsys, probe, option):
    argv = ["probe", probe, "--model", str(model_dir), option, "1e9", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    one_error_line(capsys, option, "1000000000 tokens exceed the model's 4096 positions", "max_position_embeddings")
    assert not (tmp_path / "o").exists()


def test_mqar_lengths_beyond_the_models_positions_are_refused(model_dir, tmp_path, capsys):
    argv = ["probe", "mqar", "--model", str(model_dir), "--lengths", "8k", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    one_error_line(capsys, "--lengths: 8192 tokens exceed the model's 4096 positions")
    assert not (tmp_path / "o").exists()


def test_with_knn_memory_the_lengths_must_fit_the_memory(model_dir, tmp_path, capsys):
    pytest.importorskip("memlayers.hf")
    argv = ["probe", "passkey", "--model", str(model_dir), "--memory", "knn", "--memory-option", "capacity=512",
            "--lengths", "1k", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    one_error_line(capsys, "1024 tokens exceed what the kNN memory holds (512 tokens)", "capacity=N")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out, words", [
    ("/proc/memlayers-probe/out", ["cannot write in '/proc'"]),   # unwritable even for root
    ("FILE/sub", ["exists and is not a folder"]),
])
def test_unwritable_out_is_refused_up_front(tmp_path, capsys, out, words):
    (tmp_path / "FILE").write_text("")
    out = out.replace("FILE", str(tmp_path / "FILE"))
    assert main([*MQAR_MODULE, "--out", out]) == 2
    one_error_line(capsys, "--out", *words)


@pytest.mark.parametrize("damage", ['{"seq_len": 16, "sco', "[1, 2]", '{"seq_len": 16}', "\udcff"])
def test_a_damaged_cell_record_is_named(tmp_path, capsys, damage):
    assert main([*MQAR_MODULE, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    record = sorted((tmp_path / "mqar" / "cells").glob("*.json"))[0]
    if damage == "\udcff":
        record.write_bytes(b"\xff\xfe{")
    else:
        record.write_text(damage)
    assert main([*MQAR_MODULE, "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "damaged cell record", str(record), "--overwrite")
    # --overwrite redoes the run
    assert main([*MQAR_MODULE, "--out", str(tmp_path), "--overwrite"]) == 0
    assert "score" in json.loads(record.read_text())


def test_a_damaged_manifest_is_named(tmp_path, capsys):
    assert main([*MQAR_MODULE, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    (tmp_path / "mqar" / "manifest.json").write_text("{")
    assert main([*MQAR_MODULE, "--out", str(tmp_path)]) == 2
    one_error_line(capsys, "damaged run manifest", "manifest.json")
