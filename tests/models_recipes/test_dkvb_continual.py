"""The DKVB paper's 2D toy (models/dkvb_continual/toy2d.py): the bottleneck keeps the old tasks, baselines forget."""
import importlib.util
import sys
from pathlib import Path

import torch

RECIPE = Path(__file__).resolve().parents[2] / "models" / "dkvb_continual"


def load(name):
    sys.path.insert(0, str(RECIPE))
    try:
        spec = importlib.util.spec_from_file_location(f"dkvb_continual_{name}", RECIPE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(RECIPE))


def test_toy2d_bottleneck_resists_forgetting():
    # The naive lookup path: the kernel is compared with it in tests/ops/test_dkvb.py. Tensors are
    # tiny (batches of 32 points), so one thread avoids OpenMP synchronization costs on busy machines.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = load("toy2d").run(seed=0, backend="torch")
    finally:
        torch.set_num_threads(threads)
    assert results["dkvb"]["accuracy"] >= 0.9, results["dkvb"]
    assert min(results["dkvb"]["per_task"]) >= 0.8, results["dkvb"]
    for baseline in ("linear", "mlp"):
        # Each task was learned (so the final collapse is forgetting, not underfitting) ...
        assert min(results[baseline]["just_learned"]) >= 0.9, (baseline, results[baseline])
        assert results[baseline]["accuracy"] <= 0.4, (baseline, results[baseline])
        # ... and then forgotten: the model collapsed onto the last task.
        assert results[baseline]["per_task"][0] <= 0.1, (baseline, results[baseline])
