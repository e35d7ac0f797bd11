"""Shared pieces of the continual-learning reproductions: task splits, sequential training, evaluation.

Every model is trained the same way: the tasks in sequence, no replay, plain SGD (no momentum, no
weight decay, so that parameters with zero gradient do not move), cross-entropy over all classes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def split_tasks(x: torch.Tensor, y: torch.Tensor, classes_per_task: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Class-incremental tasks: task t holds classes [t * k, (t + 1) * k)."""
    num_classes = int(y.max()) + 1
    tasks = []
    for first in range(0, num_classes, classes_per_task):
        keep = (y >= first) & (y < first + classes_per_task)
        tasks.append((x[keep], y[keep]))
    return tasks


def train_sequentially(
    model: nn.Module,
    tasks: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> None:
    """Train on each task in turn (no replay) with plain SGD."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    for x, y in tasks:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                b = order[start : start + batch_size]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[b]), y[b]).backward()
                opt.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=-1) == y).float().mean())


@torch.no_grad()
def accuracy_per_task(model: nn.Module, tasks) -> List[float]:
    return [accuracy(model, x, y) for x, y in tasks]


def train_and_evaluate(
    models: Dict[str, Tuple[nn.Module, float]],
    tasks: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    test_tasks: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    epochs: int,
    batch_size: int,
    seed: int,
) -> Dict[str, Dict[str, object]]:
    """Train each ``name -> (model, lr)`` on the tasks in sequence; per model: ``accuracy`` on the
    whole test set, ``per_task`` test accuracy at the end and ``just_learned``, each task's test
    accuracy right after training on it (every model should learn each task)."""
    results = {}
    for name, (model, lr) in models.items():
        just_learned = []
        for task, test_task in zip(tasks, test_tasks):
            train_sequentially(model, [task], epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
            just_learned.append(accuracy(model, *test_task))
        results[name] = {
            "accuracy": accuracy(model, x_test, y_test),
            "per_task": accuracy_per_task(model, test_tasks),
            "just_learned": just_learned,
        }
    return results


def mlp(dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


def summary(results: Dict[str, Dict[str, object]]) -> str:
    lines = [f"{'model':<10} {'final acc (all classes)':>24}  {'final, per task':<30} right after learning each task"]
    for name, r in results.items():
        per = " ".join(f"{a:.2f}" for a in r["per_task"])
        learned = " ".join(f"{a:.2f}" for a in r.get("just_learned", []))
        lines.append(f"{name:<10} {r['accuracy']:>24.3f}  {per:<30} {learned}")
    return "\n".join(lines)


MODELS = ("dkvb", "linear", "mlp")
RESULT_FIELDS = ("accuracy", "per_task", "just_learned")


def recipe_main(
    doc: str,
    run: Callable[..., Dict[str, object]],
    json_name: str,
    argv=None,
    after_seed: Optional[Callable[[int, Dict[str, object], argparse.Namespace], None]] = None,
) -> int:
    """The command line of a recipe: ``run(seed=, epochs=)`` for ``--seeds`` seeds, each seed's
    summary printed, then ``{"runs", "mean_accuracy"}`` written to ``--out``/``json_name``.

    ``run`` returns ``model name -> results`` (extra result fields and a ``"data"`` entry are left
    out of the JSON); ``after_seed(seed, results, args)`` runs after each seed's summary."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="independent runs (seeds 0..n-1)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per task")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {}
    for seed in range(args.seeds):
        results = run(seed=seed, epochs=args.epochs)
        models = {k: v for k, v in results.items() if k != "data"}
        print(f"seed {seed}\n{summary(models)}\n")
        report[seed] = {k: {m: v[m] for m in RESULT_FIELDS} for k, v in models.items()}
        if after_seed is not None:
            after_seed(seed, results, args)
    mean = {m: sum(r[m]["accuracy"] for r in report.values()) / len(report) for m in MODELS}
    print("mean final accuracy:", {k: round(v, 3) for k, v in mean.items()})
    (args.out / json_name).write_text(json.dumps({"runs": report, "mean_accuracy": mean}, indent=2) + "\n")
    return 0
