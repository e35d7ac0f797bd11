"""``memlayers probe ...`` through a parser built the way memlayers/cli.py builds it."""
import argparse
import json

import pytest

from memlayers.probes.cli import add_probe_parser, run_probe

PNG = b"\x89PNG\r\n\x1a\n"


def main(argv):
    parser = argparse.ArgumentParser(prog="memlayers")
    sub = parser.add_subparsers(dest="command", required=True)
    add_probe_parser(sub)
    return run_probe(parser.parse_args(argv))


def cells(folder):
    return {p.name: json.loads(p.read_text()) for p in sorted((folder / "cells").glob("*.json"))}


def test_needle_end_to_end_and_resume(model_dir, tmp_path, capsys):
    argv = ["probe", "needle", "--model", str(model_dir), "--lengths", "256,512", "--depths", "2",
            "--max-new-tokens", "4", "--out", str(tmp_path), "--no-progress", "--save-prompts"]
    assert main(argv) == 0
    run = tmp_path / "needle-single"
    assert "results in" in capsys.readouterr().out
    first = cells(run)
    assert len(first) == 4
    for rec in first.values():
        s = rec["samples"][0]
        assert isinstance(s["response"], str) and 0.0 <= rec["score"] <= 1.0
        assert rec["config"]["model"] == str(model_dir) and rec["config"]["memory"] == {"kind": "none"}
        assert rec["config"]["max_new_tokens"] == 4 and rec["memlayers_version"]
        assert 0.98 * rec["context_length"] <= s["prompt_tokens"] <= rec["context_length"]
        assert (run / s["prompt_file"]).exists()
    assert (run / "heatmap.png").read_bytes()[:8] == PNG and (run / "summary.md").exists()
    # the same command again: nothing is redone, records are byte-identical
    texts = {p.name: p.read_text() for p in (run / "cells").glob("*.json")}
    assert main(argv) == 0
    assert {p.name: p.read_text() for p in (run / "cells").glob("*.json")} == texts


def test_passkey_retention_mqar(model_dir, tmp_path):
    common = ["--model", str(model_dir), "--out", str(tmp_path), "--no-progress"]
    assert main(["probe", "passkey", "--lengths", "256", "--depths", "0.5", "--max-new-tokens", "3", *common]) == 0
    assert len(cells(tmp_path / "passkey")) == 1
    assert main(["probe", "retention", "--distances", "0,64", "--loads", "0,2", "--max-new-tokens", "3", *common]) == 0
    recs = cells(tmp_path / "retention")
    assert {(r["distance"], r["load"]) for r in recs.values()} == {(0, 0), (0, 2), (64, 0), (64, 2)}
    assert (tmp_path / "retention" / "retention.png").read_bytes()[:8] == PNG
    assert main(["probe", "mqar", "--lengths", "32", "--kv-pairs", "2,4", "--examples", "8", "--vocab-size", "64", *common]) == 0
    recs = cells(tmp_path / "mqar")
    assert len(recs) == 2 and all(r["total"] == 8 * r["num_kv_pairs"] for r in recs.values())
    assert (tmp_path / "mqar" / "heatmap.png").read_bytes()[:8] == PNG


def test_mqar_module(tmp_path):
    assert main(["probe", "mqar", "--module", "probe_fixtures:make_induction_head", "--dim", "128", "--lengths", "64",
                 "--kv-pairs", "4,32", "--examples", "16", "--vocab-size", "256", "--out", str(tmp_path), "--no-progress"]) == 0
    (rec,) = cells(tmp_path / "mqar").values()  # 4 * 32 > 64: that cell is left out
    assert rec["score"] > 0.8 and rec["config"]["module"] == "probe_fixtures:make_induction_head"
    assert main(["probe", "mqar", "--module", "probe_fixtures:make_causal_attention", "--dim", "16", "--lengths", "16",
                 "--kv-pairs", "2", "--examples", "8", "--vocab-size", "32", "--train-steps", "2",
                 "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    (rec,) = cells(tmp_path / "t" / "mqar").values()
    assert rec["config"]["train_steps"] == 2 and rec["total"] == 16


@pytest.mark.parametrize("kind, options, check", [
    ("knn", ["top_k=4", "capacity=512"], ("top_k", 4)),   # a small capacity keeps the CPU search quick
    ("titans", ["heads=2"], ("heads", 2)),
])
def test_memory_attached(model_dir, tmp_path, capsys, kind, options, check):
    argv = ["probe", "passkey", "--model", str(model_dir), "--memory", kind,
            *[a for o in options for a in ("--memory-option", o)],
            "--chunk-size", "64", "--lengths", "256", "--depths", "0.5", "--max-new-tokens", "3",
            "--out", str(tmp_path), "--no-progress"]
    try:
        import memlayers.hf  # noqa: F401
    except ImportError:
        assert main(argv) == 2 and "memlayers.hf" in capsys.readouterr().err
        return
    assert main(argv) == 0, capsys.readouterr().err
    (rec,) = cells(tmp_path / "passkey").values()
    assert rec["config"]["memory"]["kind"] == kind and rec["config"]["memory"][check[0]] == check[1]
    assert rec["config"]["chunk_size"] == 64 and isinstance(rec["samples"][0]["response"], str)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "/no/such/model"], "does not exist"),
        (["--model", "MODEL", "--memory-option", "top_k=4"], "--memory-option needs --memory"),
        (["--model", "MODEL", "--lengths", "40"], "too short"),
    ],
)
def test_errors_exit_2_without_traceback(model_dir, tmp_path, capsys, extra, message):
    extra = [str(model_dir) if e == "MODEL" else e for e in extra]
    assert main(["probe", "needle", *extra, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "memlayers probe needle: error: " in err and message in err
    assert not (tmp_path / "o").exists()


def test_out_is_a_file(model_dir, tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("")
    assert main(["probe", "passkey", "--model", str(model_dir), "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["probe", "needle", "--model", "m", "--out", "o", "--lengths", "abc"],
        ["probe", "needle", "--model", "m", "--out", "o", "--depths", "0.5,2"],
        ["probe", "needle", "--model", "m", "--out", "o", "--variant", "other"],
        ["probe", "passkey", "--out", "o"],                       # --model missing
        ["probe", "mqar", "--model", "m", "--module", "x:y", "--out", "o"],
        ["probe", "sideways", "--out", "o"],
    ],
)
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_help_explains_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["probe", "needle", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in ("--lengths", "k = 1024", "--depths", "--memory", "--out", "resumes", "--variant"):
        assert text in out


def test_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["probe", "passkey", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "could not load model" in err and "Traceback" not in err
