"""The resumable runner, records, plots and reports, with scripted responders (no model)."""
import json

import pytest

from memlayers.probes import load_records, run_cells, run_needle, run_passkey, run_retention
from probe_fixtures import oracle

PNG = b"\x89PNG\r\n\x1a\n"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_oracle_scores_one_everywhere(tokenizer, tmp_path):
    recs = run_needle(oracle, tokenizer, tmp_path / "n", lengths=[384, 512], depths=3, variant="multiquery", progress=False)
    assert len(recs) == 6 and all(r["score"] == 1.0 for r in recs)
    r = recs[0]
    for key in ("context_length", "depth", "score", "time_s", "config", "memlayers_version", "created", "samples"):
        assert key in r
    s = r["samples"][0]
    assert s["response"].count(",") == 3 and len(s["expected"]) == 4 and s["needles"]
    assert 0.98 * r["context_length"] <= s["prompt_tokens"] <= r["context_length"]
    assert r["config"]["variant"] == "multiquery" and r["config"]["model"] == "oracle"
    w, h = _png_size(tmp_path / "n" / "heatmap.png")
    assert w > 300 and h > 200
    md = (tmp_path / "n" / "summary.md").read_text()
    assert "| mean | 1.00 | 1.00 | 1.00 |" in md


def test_partial_answers_give_partial_scores(tokenizer, tmp_path):
    def half(sample):  # names every other expected value, as a partly right model would
        return " " + ", ".join(sample.expected[::2])

    recs = run_needle(half, tokenizer, tmp_path, lengths=[256], depths=[0.5], variant="multivalue", progress=False)
    assert recs[0]["score"] == 0.5


def test_passkey_and_retention_reports(tokenizer, tmp_path):
    recs = run_passkey(oracle, tokenizer, tmp_path / "p", lengths=[256], depths=2, progress=False)
    assert [r["score"] for r in recs] == [1.0, 1.0]
    assert (tmp_path / "p" / "heatmap.png").read_bytes()[:8] == PNG

    def forgetful(sample):  # remembers only when nothing intervened
        return oracle(sample) if sample.params["distance"] == 0 and sample.params["load"] == 0 else " no idea"

    recs = run_retention(forgetful, tokenizer, tmp_path / "r", distances=[0, 64], loads=[0, 2], progress=False)
    scores = {(r["distance"], r["load"]): r["score"] for r in recs}
    assert scores == {(0, 0): 1.0, (0, 2): 0.0, (64, 0): 0.0, (64, 2): 0.0}
    assert _png_size(tmp_path / "r" / "retention.png")[0] > 600
    assert "| 0 | 1.00 | 0.00 | 0.50 |" in (tmp_path / "r" / "summary.md").read_text()


def test_interrupted_run_resumes_without_redoing_cells(tokenizer, tmp_path):
    calls = []

    def flaky(sample):
        calls.append(sample.params["context_length"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third cell
        return oracle(sample)

    flaky.__name__ = "oracle"  # the records name the model by the responder's name
    grid = dict(lengths=[256, 512], depths=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_needle(flaky, tokenizer, tmp_path, **grid)
    assert len(list((tmp_path / "cells").glob("*.json"))) == 2
    assert not list((tmp_path / "cells").glob("*.tmp"))
    first = {p.name: p.read_text() for p in (tmp_path / "cells").glob("*.json")}

    calls.clear()
    recs = run_needle(oracle_counting(calls), tokenizer, tmp_path, **grid)
    assert len(calls) == 2 and len(recs) == 4  # only the two unfinished cells ran
    for name, text in first.items():
        assert (tmp_path / "cells" / name).read_text() == text  # finished records untouched
    calls.clear()
    run_needle(oracle_counting(calls), tokenizer, tmp_path, **grid)
    assert calls == []
    # a larger grid does only the new cells
    run_needle(oracle_counting(calls), tokenizer, tmp_path, lengths=[256, 512, 1024], depths=2, progress=False)
    assert calls == [1024, 1024]
    assert len(load_records(tmp_path)) == 6


def oracle_counting(calls):
    def respond(sample):
        calls.append(sample.params["context_length"])
        return oracle(sample)

    respond.__name__ = "oracle"  # same settings as the interrupted run
    return respond


def test_changed_settings_are_refused(tokenizer, tmp_path):
    run_needle(oracle, tokenizer, tmp_path, lengths=[256], depths=1, progress=False)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        run_needle(oracle, tokenizer, tmp_path, lengths=[256], depths=1, seed=1, progress=False)
    recs = run_needle(oracle, tokenizer, tmp_path, lengths=[256], depths=1, seed=1, overwrite=True, progress=False)
    assert recs[0]["config"]["seed"] == 1
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["seed"] == 1


def test_save_prompts(tokenizer, tmp_path):
    recs = run_passkey(oracle, tokenizer, tmp_path, lengths=[256], depths=[0.5], save_prompts=True, progress=False)
    f = tmp_path / recs[0]["samples"][0]["prompt_file"]
    assert f.read_text().endswith("What is the pass key? The pass key is")


def test_bad_input_changes_nothing(tokenizer, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="context_length=40 is too short"):
        run_needle(oracle, tokenizer, out, lengths=[40, 1024], depths=2, progress=False)
    with pytest.raises(ValueError, match="depths"):
        run_needle(oracle, tokenizer, out, lengths=[256], depths=[0.5, float("nan")], progress=False)
    with pytest.raises(TypeError, match="lengths"):
        run_passkey(oracle, tokenizer, out, lengths=[256.0], progress=False)
    with pytest.raises(ValueError, match="loads"):
        run_retention(oracle, tokenizer, out, loads=[-1], progress=False)
    with pytest.raises(TypeError, match="responder"):
        run_needle("model", tokenizer, out, lengths=[256], progress=False)
    assert not out.exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="out_dir"):
        run_cells(f, {}, [{"a": 1}], lambda c: {"score": 1.0})


def test_report_and_responder_bad_input(tmp_path):
    import torch

    from memlayers.probes import HFResponder, attach_memory, plot_heatmap, summary_markdown

    with pytest.raises(ValueError, match="records"):
        plot_heatmap([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'depth'"):
        summary_markdown([{"context_length": 1, "score": 1.0}], x="context_length", y="depth")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        HFResponder(model, None, max_new_tokens=0)
    with pytest.raises(ValueError, match="memory"):
        attach_memory(model, "lstm")
    assert not (tmp_path / "x.png").exists()
