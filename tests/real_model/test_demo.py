"""`memlayers demo`'s real-model part at a reduced size: the table and the cost figures it reports."""
import pytest

from memlayers.cli import main
from memlayers.hf.demo import run_real_demo


@pytest.mark.slow
def test_real_demo_small_recalls_with_memory_and_reports_costs(capsys):
    s = run_real_demo("smollm2", doc_tokens=512, window=128, depths=(0.3,), new_tokens=6)
    (row,) = s["rows"]
    assert not row["in window"] and row["needle at token"] < 512 - 128
    assert row["kNN memory ok"] and s["recalled with kNN memory"] == 1, row
    assert not row["window only ok"] and s["recalled window only"] == 0, row
    assert s["needles"] == 1 and s["document tokens"] == 512 and s["window"] == 128
    assert s["memory config"]["capacity"] == 512
    for key in ("memorize tokens/s", "plain forward tokens/s", "decode ms/token, kNN memory",
                "decode ms/token, window only", "memory bytes"):
        assert s[key] > 0, key
    # 30 layers x (keys + values) x 3 kv heads x 64 dims x 512 slots in fp32, at least.
    assert s["memory bytes"] >= 30 * 2 * 3 * 64 * 512 * 4
    out = capsys.readouterr().out
    assert "recalled: kNN memory 1/1, window only 0/1" in out and "tokens/s" in out


def test_demo_command_rejects_a_document_shorter_than_two_windows(capsys):
    assert main(["demo", "--part", "real", "--doc-tokens", "200", "--window", "128"]) == 2
    assert "--doc-tokens" in capsys.readouterr().err
