"""Shared pieces of the continual-learning reproductions: task splits, sequential training, evaluation.

Every model is trained the same way: the tasks in sequence, no replay, plain SGD (no momentum, no
weight decay, so that parameters with zero gradient do not move), cross-entropy over all classes.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

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


def mlp(dim: int, hidden: int, out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))


def summary(results: Dict[str, Dict[str, object]]) -> str:
    lines = [f"{'model':<10} {'final acc (all classes)':>24}  {'final, per task':<30} right after learning each task"]
    for name, r in results.items():
        per = " ".join(f"{a:.2f}" for a in r["per_task"])
        learned = " ".join(f"{a:.2f}" for a in r.get("just_learned", []))
        lines.append(f"{name:<10} {r['accuracy']:>24.3f}  {per:<30} {learned}")
    return "\n".join(lines)
