"""The `memlayers` command line and the demo's store part."""
import pytest

from memlayers.cli import build_parser, main
from memlayers.demo import format_rows, run_store_demo
from memlayers.hf import pretrained


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "bench", "probe"):
        assert command in out


def test_probe_subcommand_is_wired(tmp_path, capsys):
    code = main(["probe", "needle", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train"])
    assert exit_info.value.code == 2


def test_store_demo_small():
    pytest.importorskip("faiss")
    rows = run_store_demo(tokens=3_000, capacity=1_024, heads=2, dim=16, queries=8, k=8, chunk=500)
    by = {r["backend"]: r for r in rows}
    assert by["exact (torch)"]["stored"] == 2 * 1_024
    assert by["exact (torch)"]["recall@8"] == 1.0
    assert by["faiss flat"]["recall@8"] == 1.0
    assert 0.0 < by["faiss hnsw"]["recall@8"] <= 1.0
    table = format_rows(rows)
    assert "faiss ivf" in table and "recall@8" in table


def test_demo_without_the_embedded_model_says_how_to_get_it_and_runs_the_tiny_part(monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.setitem(pretrained.EMBEDDED, "smollm2", ("memlayers_no_such_package", "missing.gguf"))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    (skipped,) = [line for line in out.splitlines() if line.startswith("skipped:")]
    assert pretrained.INSTALL_HINT in skipped
    assert "equivalence check: PASS" in out


@pytest.mark.parametrize("argv", [["demo", "--part", "everything"], ["demo", "--depths", "0.2,1.5"],
                                  ["demo", "--window", "0"]])
def test_demo_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
