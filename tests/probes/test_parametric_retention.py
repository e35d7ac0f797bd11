"""The retention probe's parametric mode (facts written into weights, batch after batch) with a fake
model: injecting a batch teaches it and makes it forget earlier batches by a fixed amount."""
import pytest

from memlayers.probes import load_records, run_parametric_retention
from memlayers.probes.plots import plots_available

PNG = b"\x89PNG\r\n\x1a\n"


class FakeInjection:
    """After batch ``b``, facts of batch ``j <= b`` score ``1 - decay * (b - j)`` (never below 0)."""

    def __init__(self, decay=0.25):
        self.decay = decay
        self.calls = []

    def __call__(self, b):
        self.calls.append(b)
        return lambda j: {"score": max(0.0, 1.0 - self.decay * (b - j)), "asked": 4}


def test_cells_scores_and_curves(tmp_path):
    inject = FakeInjection()
    recs = run_parametric_retention(inject, tmp_path, batches=3, name="fake", config={"method": "toy"}, progress=False)
    assert inject.calls == [0, 1, 2]  # each batch injected once, in order
    cells = [(r["after_batch"], r["facts_batch"], r["score"]) for r in recs]
    assert cells == [(0, 0, 1.0), (1, 0, 0.75), (1, 1, 1.0), (2, 0, 0.5), (2, 1, 0.75), (2, 2, 1.0)]
    assert all(r["asked"] == 4 and r["config"]["method"] == "toy" and r["config"]["model"] == "fake" for r in recs)
    assert sorted((r["after_batch"], r["facts_batch"]) for r in load_records(tmp_path)) == [c[:2] for c in sorted(cells)]
    md = (tmp_path / "summary.md").read_text()
    assert "| mean | 1.00 | 0.88 | 0.75 | 0.83 |" in md  # columns: after batch 0, 1, 2; then all cells
    if plots_available():
        assert (tmp_path / "retention.png").read_bytes()[:8] == PNG


def test_rerun_replays_injections_only_as_far_as_needed(tmp_path):
    run_parametric_retention(FakeInjection(), tmp_path, batches=2, progress=False, plots=False)
    again = FakeInjection()
    recs = run_parametric_retention(again, tmp_path, batches=2, progress=False, plots=False)
    assert again.calls == [] and len(recs) == 3  # every cell recorded: nothing injected
    (tmp_path / "cells" / "after_batch=1__facts_batch=1.json").unlink()
    partial = FakeInjection()
    recs = run_parametric_retention(partial, tmp_path, batches=2, progress=False, plots=False)
    assert partial.calls == [0, 1] and [r["score"] for r in recs] == [1.0, 0.75, 1.0]
    grown = FakeInjection()
    with pytest.raises(ValueError, match="other settings"):  # batches is part of the settings
        run_parametric_retention(grown, tmp_path, batches=3, progress=False, plots=False)
    recs = run_parametric_retention(grown, tmp_path, batches=3, overwrite=True, progress=False, plots=False)
    assert grown.calls == [0, 1, 2] and len(recs) == 6


def test_plain_float_scores(tmp_path):
    recs = run_parametric_retention(lambda b: (lambda j: 1 if j == b else 0), tmp_path, batches=2, progress=False,
                                    plots=False)
    assert [r["score"] for r in recs] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("inject, batches, match", [
    ("not callable", 2, "inject must be callable"),
    (FakeInjection(), 0, "batches must be an int >= 1"),
    (FakeInjection(), True, "batches must be an int >= 1"),
    (lambda b: 0.5, 1, r"inject\(0\) must return a responder"),
    (lambda b: (lambda j: 1.5), 1, r"in \[0, 1\], got 1.5"),
    (lambda b: (lambda j: {"asked": 3}), 1, "got None"),
])
def test_bad_input_is_named(tmp_path, inject, batches, match):
    with pytest.raises((TypeError, ValueError), match=match):
        run_parametric_retention(inject, tmp_path / "out", batches=batches, progress=False, plots=False)


# ``memlayers probe retention --inject``: the parametric mode from the command line.

FACTORY = '''
calls = []


def make(seed=0, decay=0.25):
    """After batch b, facts of batch j score 1 - decay * (b - j); every injection is logged in calls."""
    def inject(b):
        calls.append(b)
        return lambda j: {"score": max(0.0, 1.0 - decay * (b - j)), "seed": seed}
    return inject
'''


@pytest.fixture
def fake_factory(tmp_path, monkeypatch):
    """A module ``fake_injection`` (importable, and as a file) with the factory ``make``."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "fake_injection.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(folder))
    yield folder / "fake_injection.py"
    import sys

    sys.modules.pop("fake_injection", None)


def cli(argv):
    from test_cli import main

    return main(["probe", "retention", *argv, "--no-progress"])


def test_cli_inject_runs_resumes_and_records_its_options(tmp_path, fake_factory):
    import fake_injection

    argv = ["--inject", "fake_injection:make", "--inject-option", "decay=0.5", "--batches", "3", "--seed", "7",
            "--out", str(tmp_path / "out")]
    assert cli(argv) == 0
    run = tmp_path / "out" / "parametric-retention"
    recs = load_records(run)
    assert sorted((r["after_batch"], r["facts_batch"], r["score"]) for r in recs) == [
        (0, 0, 1.0), (1, 0, 0.5), (1, 1, 1.0), (2, 0, 0.0), (2, 1, 0.5), (2, 2, 1.0)]
    assert all(r["seed"] == 7 and r["config"]["inject_options"] == {"decay": 0.5} for r in recs)
    assert recs[0]["config"]["model"] == "fake_injection:make" and (run / "summary.md").exists()
    if plots_available():
        assert (run / "retention.png").read_bytes()[:8] == PNG
    assert fake_injection.calls == [0, 1, 2]
    assert cli(argv) == 0 and fake_injection.calls == [0, 1, 2]  # resumed: every cell recorded, nothing injected
    (run / "cells" / "after_batch=2__facts_batch=2.json").unlink()
    assert cli(argv) == 0 and fake_injection.calls == [0, 1, 2, 0, 1, 2]  # replayed up to the missing cell
    assert cli([*argv[:3], "decay=0.25", *argv[4:]]) == 2  # other options into the same folder: refused


def test_cli_inject_from_a_file(tmp_path, fake_factory):
    assert cli(["--inject", f"{fake_factory}:make", "--batches", "2", "--out", str(tmp_path / "out")]) == 0
    assert len(load_records(tmp_path / "out" / "parametric-retention")) == 3


@pytest.mark.parametrize("argv, words", [
    ([], "give --model (facts in the context) or --inject"),
    (["--inject", "fake_injection:make"], "--inject needs --batches"),
    (["--inject", "fake_injection:make", "--batches", "2", "--model", "m"], "--model and --inject exclude each other"),
    (["--inject", "fake_injection:make", "--batches", "2", "--loads", "1,2"], "--loads applies to --model"),
    (["--inject", "fake_injection:make", "--batches", "2", "--inject-option", "seed=3"], "give --seed instead"),
    (["--inject", "fake_injection:make", "--batches", "2", "--inject-option", "nope=1"], "unexpected keyword"),
    (["--inject", "fake_injection", "--batches", "2"], "--inject must look like"),
    (["--inject", "no/such/file.py:make", "--batches", "2"], "no such file"),
    (["--inject", "fake_injection:missing", "--batches", "2"], "cannot import"),
    (["--model", "m", "--batches", "2"], "--batches applies to --inject"),
])
def test_cli_inject_bad_input_is_one_line(tmp_path, fake_factory, capsys, argv, words):
    assert cli([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "out" / "parametric-retention").exists()
