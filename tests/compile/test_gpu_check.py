"""``make gpu-check`` without a GPU: its dry run walks the same code paths on CPU at tiny sizes with the
network cut off, its target table computes the issue's ratios, and its recipe needs no pip or venv."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

# Loaded before anything else in the dry run's python: any attempt to open a network connection raises.
NO_NETWORK = '''
import socket
def _refuse(*args, **kwargs):
    raise OSError("gpu-check must not use the network")
socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
'''


@pytest.mark.slow
def test_dry_run_writes_every_step_without_network(tmp_path):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(ROOT)])
    steps = "gpu-tests,knn_search,memory_attention,titans,dkvb,pkm"
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run", "--results", str(tmp_path / "out"), "--steps", steps,
         "--tests", "tests/compile/test_gpu_check.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu-check-dryrun.json").read_text())
    assert [t["target"] for t in summary["targets"]] == [t["target"] for t in gpu_check.targets({})]
    for name in steps.split(",")[1:]:
        payload = json.loads((tmp_path / "out" / f"{name}-dryrun.json").read_text())
        assert payload["complete"], payload.get("errors")
        assert payload["rows"], f"{name}: no rows"
        assert payload["machine"]["device"] == "cpu"
    gpu_tests = json.loads((tmp_path / "out" / "gpu-tests-dryrun.json").read_text())
    assert gpu_tests["returncode"] in (0, 5), gpu_tests["tail"]  # 5: this file holds no gpu test
    # Peers missing here are reported, never a failure.
    titans = {t["target"]: t for t in summary["targets"] if "titans-pytorch" in t["target"]}
    for line in titans.values():
        assert line["met"] is None and line["note"] in ("not installed", "")
    assert "DRY RUN" in proc.stdout


def test_targets_compute_the_issue_ratios():
    results = {
        "knn_search": [{"provider": "memlayers", "ms": 2.0}, {"provider": "torch matmul+topk", "ms": 7.0},
                       {"provider": "matmul only", "ms": 1.5}],
        "memory_attention": [{"provider": "fused", "pass": "fwd", "ms": 1.0},
                             {"provider": "torch-gather", "pass": "fwd", "ms": 2.5}],
        "titans": [{"memory": "mlp", "provider": "memlayers-triton", "tokens_per_s": 5e6, "peak_MB": 100.0},
                   {"memory": "mlp", "provider": "titans-pytorch", "tokens_per_s": 4e5, "peak_MB": 900.0},
                   {"provider": "fla-gated-delta", "note": "not installed"}],
        "pkm": [{"provider": "ours", "pass": "fwd", "bw_fraction": 0.72},
                {"provider": "ours", "pass": "bwd", "speedup_vs_ref": 2.0}],
        "hf": [{"memory_tokens": 0, "decode_vs_base": 1.0}, {"memory_tokens": 65536, "decode_vs_base": 0.9},
               {"memory_tokens": 262144, "decode_vs_base": 0.75}],
    }
    got = {t["target"]: t for t in gpu_check.targets(results)}

    def line(prefix):
        return next(t for name, t in got.items() if name.startswith(prefix))

    assert line("knn_search T=4096")["measured"] == pytest.approx(3.5) and line("knn_search T=4096")["met"]
    assert line("knn_search: time over")["measured"] == pytest.approx(2.0 / 1.5)
    assert line("knn_search: time over")["met"] is True
    assert line("memory_attention fwd:")["measured"] == pytest.approx(2.5) and line("memory_attention fwd:")["met"] is False
    assert line("memory_attention fwd+bwd")["met"] is None  # not measured
    assert line("Titans MLP fwd+bwd 8K tokens: tokens/s")["measured"] == pytest.approx(12.5)
    assert line("Titans MLP fwd+bwd 8K tokens: peak")["measured"] == pytest.approx(100 / 900)
    assert line("Titans linear")["note"] == "not installed" and line("Titans linear")["met"] is None
    assert line("DKVB fwd+bwd: speedup")["measured"] is None
    assert line("PKM gather fwd")["met"] is True and line("PKM gather bwd")["met"] is False
    hf = line("HF decode")
    assert "262144" in hf["target"] and hf["measured"] == pytest.approx(0.75) and hf["met"] is True


def test_recipe_needs_no_venv_pip_or_network():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^gpu-check:(.*?)\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no gpu-check target"
    assert recipe.group(1).strip() == "", "gpu-check must not depend on the venv or other targets"
    assert "python3 bench/gpu_check.py" in recipe.group(2)
    for word in ("pip", "$(BIN)", ".venv", "curl", "wget"):
        assert word not in recipe.group(2)
    source = (ROOT / "bench" / "gpu_check.py").read_text()
    for word in ("pip install", "urllib", "requests", "http://", "https://", "from_pretrained", "snapshot_download"):
        assert word not in source


def test_budgets_fit_the_deadline():
    assert set(gpu_check.BUDGETS_S) == {"gpu-tests", *gpu_check.STEPS}
    assert sum(gpu_check.BUDGETS_S.values()) <= gpu_check.DEADLINE_S <= 480
